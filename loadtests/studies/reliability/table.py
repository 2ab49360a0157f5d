"""The table every part adds its rows to."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


@dataclass
class Row:
    name: str
    value: float | None  # None: not measured (printed as "-")
    unit: str
    base: float | None = None  # what `value` is set beside: the same without the stress
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.base:
            return None
        return float(f"{self.value / self.base:.3g}")


def num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if float(value).is_integer() or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 5e-4 else "0"


def format_table(rows: list[Row]) -> str:
    width = max([len("row"), *(len(r.name) for r in rows)]) + 2
    lines = [f"{'row':<{width}}{'value':>10}  {'unit':<12}{'base':>10}{'x base':>8}  detail"]
    for r in rows:
        lines.append(f"{r.name:<{width}}{num(r.value):>10}  {r.unit:<12}{num(r.base):>10}"
                     f"{num(r.ratio):>8}  {r.detail}".rstrip())
    return "\n".join(lines)


def statuses_text(statuses: Counter, socket_errors: int = 0) -> str:
    parts = [f"{s} x{c}" if s else f"no answer x{c}"
             for s, c in sorted(statuses.items()) if s != 200]
    if socket_errors:
        parts.append(f"socket errors x{socket_errors}")
    return ", ".join(parts) or "none"


def failures(statuses: Counter) -> int:
    return sum(c for s, c in statuses.items() if s != 200)


def codes(statuses: Counter) -> str:
    return ", ".join(f"{s or 'closed'} x{c}" for s, c in sorted(statuses.items()))
