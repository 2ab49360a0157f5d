"""The run's figures as JSON and as an HTML page with its charts."""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kiln.loadtests import svg
from kiln.loadtests.studies.reliability.table import Row, num


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    kill_timeline: dict = field(default_factory=dict)
    memory: list = field(default_factory=list)


def html_report(report: Report) -> str:
    labels = sorted({k for _, v in report.memory for k in v})
    charts = [svg.line_chart(f"{kind} during the soak",
                             {k: [(t, v[k][i]) for t, v in report.memory
                                  if k in v and v[k][i] is not None] for k in labels}, "MB")
              for i, kind in enumerate(("RSS", "PSS"))]
    if report.kill_timeline:
        tl = report.kill_timeline
        charts.append(svg.line_chart(
            f"Latency around the worker kill (at {tl['kill_s']:.1f}s)",
            {k: [(t, ms) for t, ms, _ in tl[k]] for k in ("probe", "bystander")}, "ms",
            "seconds since the load started"))
    rows = "".join(f"<tr><td>{html.escape(r.name)}</td><td>{num(r.value)}</td>"
                   f"<td>{html.escape(r.unit)}</td><td>{num(r.base)}</td><td>{num(r.ratio)}"
                   f"</td><td>{html.escape(r.detail)}</td></tr>" for r in report.rows)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Kiln "
            "reliability</title><style>body{font-family:sans-serif;margin:24px}td,th{border:"
            "1px solid #ccc;padding:3px 8px}table{border-collapse:collapse}</style></head>"
            "<body><h1>Reliability</h1><table><tr><th>row</th><th>value</th><th>unit</th>"
            f"<th>base</th><th>x base</th><th>detail</th></tr>{rows}</table>"
            f"{''.join(f'<figure>{c}</figure>' for c in charts)}</body></html>\n")


def write(report: Report, opts: argparse.Namespace, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()}
    figures = {"settings": settings,
               "rows": [{**asdict(r), "ratio": r.ratio} for r in report.rows],
               "kill_timeline": report.kill_timeline, "memory": report.memory}
    (out / "reliability.json").write_text(json.dumps(figures, indent=1) + "\n")
    (out / "reliability.html").write_text(html_report(report))
