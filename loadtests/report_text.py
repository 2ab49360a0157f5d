"""The load test in the terminal: the per-endpoint table and the thresholds' verdict, the same
cells as the HTML report's (report_data makes them once for both)."""

from __future__ import annotations

from kiln.loadtests import report_data
from kiln.loadtests.thresholds import Check, passed


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Columns two spaces apart: the first (a name) to the left, the others (numbers) right."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in (header, *rows))


def render(endpoints: list[tuple[str, ...]], checks: list[Check]) -> str:
    if not checks:  # locust stopped before its quitting listener wrote one
        verdict = "not evaluated"
    else:
        verdict = "PASSED" if passed(checks) else "FAILED"
    return "\n".join([table(report_data.ENDPOINT_HEADER, endpoints), "",
                      f"thresholds: {verdict}",
                      table(report_data.VERDICT_HEADER, report_data.verdict_rows(checks))])
