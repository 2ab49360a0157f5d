"""A shadow version's comparison figures (issue 18, `kiln shadow`), read back from the metrics
that Kiln's OIP plugin keeps (deploy/oip_plugin, Shadow.java) on the front proxy's metrics
port, for `kiln models`.

Per (model, candidate): requests sampled by outcome, top-1 agreement over the rows compared by
label, mean and max absolute difference over the values compared (regression, raw), and the
mean latency of the candidate beside the primary's on the same requests.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import requests
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "kiln_shadow_"
# What the plugin records (Shadow.java), labelled model_name and version (the candidate).
METRICS = ("kiln_shadow_requests_total", "kiln_shadow_rows_total", "kiln_shadow_agreed_rows_total",
           "kiln_shadow_values_total", "kiln_shadow_abs_diff_sum_total", "kiln_shadow_abs_diff_max",
           "kiln_shadow_latency_seconds")
TIMEOUT_S = 5


@dataclass
class Figures:
    outcomes: dict[str, float] = field(default_factory=dict)
    rows: float = 0
    agreed: float = 0
    values: float = 0
    diff_sum: float = 0
    diff_max: float = 0
    # role ("primary", "candidate") -> [sum of seconds, count]
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    def line(self) -> str:
        parts = [" ".join(f"{k} {v:g}" for k, v in sorted(self.outcomes.items()))]
        if self.rows:
            parts.append(f"agreement {100 * self.agreed / self.rows:.1f}% of {self.rows:g} rows")
        if self.values:
            parts.append(f"|diff| mean {self.diff_sum / self.values:.3g} max {self.diff_max:.3g}")
        means = {role: s / n for role, (s, n) in self.latency.items() if n}
        if means:
            parts.append("mean latency " + ", ".join(
                f"{role} {1000 * means[role]:.1f} ms" for role in ("primary", "candidate")
                if role in means))
        return "; ".join(p for p in parts if p)


def parse(page: str) -> dict[tuple[str, str], Figures]:
    """{(model, candidate version): its figures} of a Prometheus text page."""
    out: dict[tuple[str, str], Figures] = defaultdict(Figures)
    for family in text_string_to_metric_families(page):
        if not family.name.startswith(PREFIX):
            continue
        for s in family.samples:
            if "model_name" not in s.labels or "version" not in s.labels:
                continue
            f = out[(s.labels["model_name"], s.labels["version"])]
            _add(f, s.name, s.labels, s.value)
    return dict(out)


def _add(f: Figures, name: str, labels: dict, value: float) -> None:
    short = name.removeprefix(PREFIX)
    if short == "requests_total":
        f.outcomes[labels["outcome"]] = value
    elif short == "rows_total":
        f.rows = value
    elif short == "agreed_rows_total":
        f.agreed = value
    elif short == "values_total":
        f.values = value
    elif short == "abs_diff_sum_total":
        f.diff_sum = value
    elif short == "abs_diff_max":
        f.diff_max = value
    elif short in ("latency_seconds_sum", "latency_seconds_count"):
        f.latency[labels["role"]][short.endswith("count")] = value


def read(metrics_url: str) -> dict[tuple[str, str], Figures]:
    """The figures on a running server's metrics port; {} when it cannot be read (the
    table of versions is still worth printing)."""
    try:
        r = requests.get(f"{metrics_url}/metrics", timeout=TIMEOUT_S)
        r.raise_for_status()
    except requests.RequestException:
        return {}
    return parse(r.text)
