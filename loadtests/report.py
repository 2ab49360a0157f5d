"""The load test's one self-contained HTML file: inline SVG charts, inline CSS, no scripts."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from kiln.loadtests import report_data, svg
from kiln.loadtests.thresholds import Check

STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1360px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 10px}
.held{color:#176117;font-weight:bold}.failed{color:#b00020;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}"""


@dataclass
class Run:
    """What one load test collected; times are Unix seconds."""

    model: str
    shape: str
    users: int
    spawn_rate: float
    duration: float
    target: str
    started: float
    checks: list[Check]
    history: dict = field(default_factory=dict)
    scrapes: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    cores: int = 1
    endpoints: list = field(default_factory=list)  # report_data.read_endpoints' rows


def html_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _verdict(checks: list[Check]) -> str:
    ok = all(c.held for c in checks)
    return (f"<p class='{'held' if ok else 'failed'}'>{'PASSED' if ok else 'FAILED'}</p>"
            + html_table(report_data.VERDICT_HEADER, report_data.verdict_rows(checks)))


def _cpu_table(cpu: dict, cores: int) -> str:
    rows = []
    for group, series in cpu.items():
        mean, peak = report_data.summary(series)
        rows.append(f"<tr><td>{html.escape(group)}</td><td>{mean:.0f} %</td>"
                    f"<td>{peak:.0f} %</td></tr>")
    return (f"<p>CPU on this machine's {cores} cores (100 % = one core); the load generator "
            "shares them with the server, so its share is load the server did not get.</p>"
            "<table><tr><th>processes</th><th>mean</th><th>peak</th></tr>"
            f"{''.join(rows)}</table>")


def charts(run: Run) -> list[str]:
    h = run.history
    cpu = report_data.cpu_series(run.cpu, run.started)
    split = report_data.server_split(run.scrapes, run.started, run.model)
    return [
        svg.line_chart("Response time (locust, rolling window)",
                       {p: h.get(p, []) for p in ("p50", "p95", "p99")}, "ms"),
        svg.line_chart("Throughput", {"requests/s": h.get("rps", [])}, "requests/s"),
        svg.line_chart("Errors", {"failures/s": h.get("failures/s", []),
                                  "failures (total)": h.get("failures", [])}, "failures"),
        svg.line_chart("Users", {"users": h.get("users", [])}, "users"),
        svg.line_chart(f"Server-side split, mean per request ({run.model})", split, "ms"),
        svg.line_chart("CPU: server vs load generator", cpu, "% of one core"),
    ]


def render(run: Run) -> str:
    cpu = report_data.cpu_series(run.cpu, run.started)
    total = run.history.get("requests", [])
    figures = "".join(f"<figure>{chart}</figure>" for chart in charts(run))
    sent = int(total[-1][1]) if total else 0
    failures = run.history.get("failures", [])
    failed = int(failures[-1][1]) if failures else 0
    ratio = failed / sent if sent else math.nan
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Kiln load test: {html.escape(run.model)}</title><style>{STYLE}</style></head><body>
<h1>Load test: {html.escape(run.model)}</h1>
<p>{html.escape(run.shape)} shape, up to {run.users} users (spawn rate {run.spawn_rate:g}/s) for
{run.duration:g} s against {html.escape(run.target)}; {sent} requests, {failed} failed
(ratio {ratio:.4g}).</p>
<h2>Thresholds</h2>{_verdict(run.checks)}
<h2>Endpoints</h2>{html_table(report_data.ENDPOINT_HEADER, run.endpoints)}
<h2>CPU</h2>{_cpu_table(cpu, run.cores)}
<h2>Over time</h2><div class="grid">{figures}</div>
</body></html>
"""


def write(run: Run, path: Path) -> Path:
    path.write_text(render(run), encoding="utf-8")
    return path
