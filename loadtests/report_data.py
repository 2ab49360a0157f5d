"""The load-test report's numbers, prepared from what the run collected: locust's per-second
history CSV, the Prometheus scrapes and the CPU samples. Pure functions, no I/O but reading
the CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from kiln.handlers.metrics import BATCH_SIZE_METRIC, STAGES, stage_metric

Series = list[tuple[float, float]]  # (seconds since the start, value)
PERCENTILES = ("50%", "95%", "99%")
MS_PER_SECOND = 1e3
MS_PER_MICROSECOND = 1e-3


def _number(text: str) -> float:
    return math.nan if text in ("", "N/A") else float(text)


ENDPOINT_HEADER = ("endpoint", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms")
VERDICT_HEADER = ("threshold", "limit", "actual", "result")


def _cell(text: str, spec: str) -> str:
    value = _number(text)
    return "N/A" if math.isnan(value) else format(value, spec)


def read_endpoints(path: Path) -> list[tuple[str, ...]]:
    """locust's --csv stats file as rows of ENDPOINT_HEADER's cells, one per endpoint and the
    Aggregated row last: the terminal and the HTML report print these same strings."""
    with open(path, newline="") as f:
        return [(f"{r['Type']} {r['Name']}".strip(), r["Request Count"], r["Failure Count"],
                 _cell(r["Requests/s"], ".2f"),
                 *(_cell(r[p], ".0f") for p in PERCENTILES)) for r in csv.DictReader(f)]


def verdict_rows(checks) -> list[tuple[str, ...]]:
    """The thresholds' checks as rows of VERDICT_HEADER's cells."""
    return [(c.name, c.limit, f"{c.actual:.4g}", "held" if c.held else "FAILED")
            for c in checks]


def read_history(path: Path, t0: float | None = None) -> dict[str, Series]:
    """The Aggregated rows of locust's --csv-full-history file, as series over time (from
    t0, else from the first row): users, rps, failures/s, p50/p95/p99 (ms; locust's
    rolling window) and totals."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    if not rows:
        return {}
    t0 = float(rows[0]["Timestamp"]) if t0 is None else t0
    columns = {"users": "User Count", "rps": "Requests/s", "failures/s": "Failures/s",
               "requests": "Total Request Count", "failures": "Total Failure Count",
               **{f"p{p.rstrip('%')}": p for p in PERCENTILES}}
    return {key: [(float(r["Timestamp"]) - t0, _number(r[col])) for r in rows
                  if not math.isnan(_number(r[col]))]
            for key, col in columns.items()}


def _total(samples: dict, name: str, model: str) -> float:
    """The sum of a counter over the series of one model (every other label summed)."""
    return sum(v for (n, labels), v in samples.items()
               if n == name and ("model_name", model) in labels)


def _means(scrapes, t0: float, model: str, sum_name: str, count_name: str,
           scale: float) -> Series:
    """Per-interval means between consecutive scrapes: delta(sum) / delta(count) * scale."""
    out = []
    for (_, a), (t_b, b) in zip(scrapes, scrapes[1:], strict=False):
        count = _total(b, count_name, model) - _total(a, count_name, model)
        if count > 0:
            total = _total(b, sum_name, model) - _total(a, sum_name, model)
            out.append((t_b - t0, total / count * scale))
    return out


def server_split(scrapes: list, t0: float, model: str) -> dict[str, Series]:
    """Mean milliseconds per request in TorchServe's queue and in each handler stage."""
    split = {"queue": _means(scrapes, t0, model, "ts_queue_latency_microseconds",
                             "ts_inference_requests_total", MS_PER_MICROSECOND)}
    for stage in STAGES:
        name = stage_metric(stage)  # the handler's own name: the report reads what it records
        split[stage] = _means(scrapes, t0, model, f"{name}_sum", f"{name}_count",
                              MS_PER_SECOND)
    return split


def batch_sizes(scrapes: list, t0: float, model: str) -> Series:
    return _means(scrapes, t0, model, f"{BATCH_SIZE_METRIC}_sum",
                  f"{BATCH_SIZE_METRIC}_count", 1.0)


def cpu_series(samples: list, t0: float) -> dict[str, Series]:
    """{group: [(t, cpu %)]}; the first sample of each run is psutil's 0.0 baseline."""
    out: dict[str, Series] = {}
    for t, by_group in samples[1:]:
        for group, percent in by_group.items():
            out.setdefault(group, []).append((t - t0, percent))
    return out


def summary(series: Series) -> tuple[float, float]:
    """(mean, max) of a series' values; NaN for an empty one."""
    values = [v for _, v in series]
    return (sum(values) / len(values), max(values)) if values else (math.nan, math.nan)
