"""Line charts as inline SVG, written by hand: the report must open with no network and no
JavaScript. One chart is one <svg class="chart">; each series is one <path class="series">."""

from __future__ import annotations

import html
import math

WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 130, 28, 36
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
TICKS = 5


def nice_max(value: float) -> float:
    """A round upper bound of the y axis at or above value (1, 2 or 5 times a power of 10)."""
    if value <= 0 or math.isnan(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


def _scale(points, x_max, y_max):
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    return [(LEFT + x / x_max * w, TOP + h - y / y_max * h) for x, y in points]


def _axes(x_max: float, y_max: float, x_label: str, y_label: str) -> list[str]:
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for i in range(TICKS + 1):
        y = TOP + h - i * h / TICKS
        x = LEFT + i * w / TICKS
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + w}" y2="{y:.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{y_max * i / TICKS:g}</text>')
        parts.append(f'<text x="{x:.1f}" y="{TOP + h + 14}" text-anchor="middle">'
                     f'{x_max * i / TICKS:.0f}</text>')
    parts.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{TOP + h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {TOP + h / 2})">{html.escape(y_label)}</text>')
    return parts


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], y_label: str,
               x_label: str = "seconds since start") -> str:
    """An SVG line chart; a series with no points is listed in the legend as "no data"."""
    points = [p for s in series.values() for p in s]
    x_max = nice_max(max((x for x, _ in points), default=1.0))
    y_max = nice_max(max((y for _, y in points), default=1.0))
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
             f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-size="11" '
             f'font-family="sans-serif" data-points="{len(points)}">',
             f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">'
             f'{html.escape(title)}</text>', *_axes(x_max, y_max, x_label, y_label)]
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        legend_y = TOP + 12 + 16 * i
        if s:
            d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in _scale(s, x_max, y_max))
            parts.append(f'<path class="series" data-name="{html.escape(name)}" d="{d}" '
                         f'fill="none" stroke="{color}" stroke-width="1.8"/>')
        label = name if s else f"{name} (no data)"
        parts.append(f'<rect x="{WIDTH - RIGHT + 8}" y="{legend_y - 8}" width="10" '
                     f'height="10" fill="{color}"/>')
        parts.append(f'<text x="{WIDTH - RIGHT + 22}" y="{legend_y + 1}">'
                     f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
