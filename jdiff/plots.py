"""Small charts as inline SVG, for the sweep report: lines and points on a numeric (linear or log) or categorical
x axis, with axes, ticks, labels and a legend. Written here, without a plotting library, so the report needs
nothing jdiff does not already have and stays one self-contained file.

Every text (titles, labels, legend entries, tooltips) is HTML-escaped: it comes from the user (override keys and
values, run names) and is text, never markup. Each series is a ``<g class="series" data-label="...">`` and each
legend entry a ``<g class="legend-item">``, so a test (or a script) can find them.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
DASHES = ("", "6 3", "2 3", "9 3 2 3")  # after the palette's ten colours, the same colours dashed
WIDTH = 640
PLOT_HEIGHT = 240
LEFT, RIGHT, TOP, BOTTOM = 64, 18, 34, 46  # margins around the plot area
LEGEND_ROW = 18
CHAR = 6.2  # about how wide one character of the 11 px font is


@dataclass
class Series:
    """One line or set of points. ``points``: (x, y), x a number or, on a categorical axis, a category's index.
    ``kind``: "line", "points" or "line+points". ``titles``: one tooltip per point (optional)."""

    label: str
    points: list[tuple[float, float]]
    kind: str = "line"
    highlight: bool = False
    titles: Optional[list[str]] = None


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    categories: Optional[list[str]] = None  # a categorical x axis, in this order; None: numeric
    log_x: bool = False


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _short(text: str, chars: int) -> str:
    chars = max(chars, 3)
    return text if len(text) <= chars else text[:chars - 1] + "\u2026"


def nice_step(span: float, count: int = 5) -> float:
    """A step of 1, 2 or 5 times a power of ten that cuts ``span`` into about ``count`` parts."""
    raw = span / max(count, 1)
    if not raw > 0 or not math.isfinite(raw):
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if raw <= factor * power * (1 + 1e-9):
            return factor * power
    return 10.0 * power


def nice_range(lo: float, hi: float, count: int = 5) -> tuple[float, float, list[float]]:
    """(start, end, ticks): ``[lo, hi]`` widened to whole steps, and the ticks in it."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, count)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [float(f"{k * step:.12g}") for k in range(first, last + 1)]  # 0.6, not 0.6000000000000001
    return ticks[0], ticks[-1], ticks


def tick_text(value: float, step: float) -> str:
    """A tick's label: as many decimals as the step needs, so 0.1 + 0.2 reads 0.3."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return _exp_text(float(f"{value:.3g}"))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    return f"{value:.{decimals}f}"


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten from the one at or below ``lo`` to the one at or above ``hi`` (both positive), with 2 and 5
    times each as well when the range spans at most four decades."""
    first, last = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    if last == first:
        last += 1
    ticks = [10.0 ** e for e in range(first, last + 1)]
    if len(ticks) <= 5:
        ticks = sorted({float(f"{m * t:.12g}") for t in ticks for m in (1, 2, 5) if m * t <= 10.0 ** last})
    elif len(ticks) > 8:  # many decades: every second, third... power
        ticks = ticks[::math.ceil(len(ticks) / 8)]
    return ticks


def _exp_text(value: float) -> str:
    """1e-05 as 1e-5."""
    return f"{value:g}".replace("e-0", "e-").replace("e+0", "e+")


class _Scale:
    """Maps data to pixels along one axis: numeric (linear or log10) or categorical (the band's centre)."""

    def __init__(self, values: Sequence[float], start_px: float, end_px: float, *, log: bool = False,
                 categories: Optional[Sequence[str]] = None, pad: float = 0.0):
        self.start_px, self.end_px, self.log, self.categories = start_px, end_px, log, categories
        if categories is not None:
            self.lo, self.hi = -0.5, len(categories) - 0.5
            self.ticks = [float(i) for i in range(len(categories))]
            self.step = 1.0
            return
        values = [v for v in values if math.isfinite(v) and (v > 0 or not log)] or ([1.0] if log else [0.0])
        lo, hi = min(values), max(values)
        if log:  # the data's range (a little wider), with the 1-2-5 ticks that fall in it
            self.lo, self.hi = math.log10(lo), math.log10(hi)
            margin = (self.hi - self.lo) * 0.04 or 0.5
            self.lo, self.hi = self.lo - margin, self.hi + margin
            self.ticks = [t for t in log_ticks(lo, hi) if self.lo <= math.log10(t) <= self.hi]
            self.step = 0.0
            return
        self.lo, self.hi, self.ticks = nice_range(lo, hi)
        self.step = self.ticks[1] - self.ticks[0] if len(self.ticks) > 1 else 1.0
        if pad:  # a little room so points at the ends are not drawn on the axis
            margin = (self.hi - self.lo) * pad
            self.lo, self.hi = self.lo - margin, self.hi + margin

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.start_px + (v - self.lo) / ((self.hi - self.lo) or 1.0) * (self.end_px - self.start_px)

    def label(self, tick: float) -> str:
        if self.categories is not None:
            return self.categories[int(tick)]
        if self.log:
            return _exp_text(tick)
        return tick_text(tick, self.step)


def _style(index: int) -> tuple[str, str]:
    return PALETTE[index % len(PALETTE)], DASHES[(index // len(PALETTE)) % len(DASHES)]


def _f(v: float) -> str:
    return f"{v:.1f}"


def svg(chart: Chart) -> str:
    """The chart as an ``<svg>`` element, sized by its viewBox (it scales to the width it is given)."""
    series = [s for s in chart.series if s.points]
    plot_w = WIDTH - LEFT - RIGHT
    columns = 1 if len(series) <= 6 else 2
    col_w = plot_w / columns
    legend_rows = math.ceil(len(series) / columns)
    height = TOP + PLOT_HEIGHT + BOTTOM + (legend_rows * LEGEND_ROW + 8 if series else 0)
    x0, x1, y0, y1 = LEFT, LEFT + plot_w, TOP + PLOT_HEIGHT, TOP

    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points]
    sx = _Scale(xs, x0, x1, log=chart.log_x, categories=chart.categories,
                pad=0.03 if chart.categories is None else 0.0)
    sy = _Scale(ys, y0, y1)

    out = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
           f'width="{WIDTH}" height="{height}" role="img" font-family="system-ui, sans-serif" font-size="11">',
           f"<title>{_esc(chart.title)}</title>",
           f'<text class="chart-title" x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13" '
           f'font-weight="bold">{_esc(_short(chart.title, int(WIDTH / 7)))}</text>']

    # grid, ticks and tick labels
    axes = ['<g class="axes" stroke="#999" fill="#333">']
    for t in sy.ticks:
        y = sy(t)
        axes.append(f'<line x1="{x0}" x2="{x1}" y1="{_f(y)}" y2="{_f(y)}" stroke="#e6e6e6"/>')
        axes.append(f'<text x="{x0 - 5}" y="{_f(y + 4)}" text-anchor="end" stroke="none">{_esc(sy.label(t))}</text>')
    band = plot_w / max(len(sx.ticks), 1)
    for t in sx.ticks:
        x = sx(t)
        axes.append(f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{y0}" y2="{y0 + 4}"/>')
        text = sx.label(t)
        shown = _short(text, int(band / CHAR)) if chart.categories is not None else text
        axes.append(f'<text class="x-tick" x="{_f(x)}" y="{y0 + 16}" text-anchor="middle" stroke="none">'
                    f'<title>{_esc(text)}</title>{_esc(shown)}</text>')
    axes.append(f'<line class="x-axis" x1="{x0}" x2="{x1}" y1="{y0}" y2="{y0}" stroke="#555"/>')
    axes.append(f'<line class="y-axis" x1="{x0}" x2="{x0}" y1="{y0}" y2="{y1}" stroke="#555"/>')
    axes.append("</g>")
    out += axes
    out.append(f'<text class="x-label" x="{_f((x0 + x1) / 2)}" y="{y0 + 36}" text-anchor="middle">'
               f'{_esc(_short(chart.x_label, int(plot_w / CHAR)))}</text>')
    out.append(f'<text class="y-label" transform="translate(14 {_f((y0 + y1) / 2)}) rotate(-90)" '
               f'text-anchor="middle">{_esc(_short(chart.y_label, int(PLOT_HEIGHT / CHAR)))}</text>')

    # the series, highlighted ones last (on top)
    order = sorted(range(len(series)), key=lambda i: series[i].highlight)
    for i in order:
        s = series[i]
        colour, dash = _style(i)
        width = 3.0 if s.highlight else 1.6
        pts = [(sx(x), sy(y)) for x, y in s.points]
        out.append(f'<g class="series{" highlight" if s.highlight else ""}" data-label="{_esc(s.label)}" '
                   f'data-points="{len(pts)}">')
        if "line" in s.kind and len(pts) > 1:
            d = "M" + " L".join(f"{_f(x)} {_f(y)}" for x, y in pts)
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="{width}"{dash_attr} '
                       f'stroke-linejoin="round"/>')
        if "points" in s.kind or len(pts) == 1:
            for k, (x, y) in enumerate(pts):
                tip = s.titles[k] if s.titles and k < len(s.titles) else f"{s.label}: {s.points[k][1]:.4g}"
                out.append(f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{4.5 if s.highlight else 3.5}" fill="{colour}" '
                           f'fill-opacity="0.85"><title>{_esc(tip)}</title></circle>')
        out.append("</g>")

    # the legend, under the plot
    if series:
        out.append('<g class="legend">')
        top = y0 + BOTTOM + 4
        for i, s in enumerate(series):
            colour, dash = _style(i)
            x, y = LEFT + (i % columns) * col_w, top + (i // columns) * LEGEND_ROW
            if "line" in s.kind:
                dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
                swatch = (f'<line x1="{_f(x)}" x2="{_f(x + 22)}" y1="{_f(y)}" y2="{_f(y)}" stroke="{colour}" '
                          f'stroke-width="{3.0 if s.highlight else 2.0}"{dash_attr}/>')
            else:
                swatch = f'<circle cx="{_f(x + 11)}" cy="{_f(y)}" r="3.5" fill="{colour}"/>'
            out.append(f'<g class="legend-item">{swatch}<text x="{_f(x + 28)}" y="{_f(y + 4)}">'
                       f'<title>{_esc(s.label)}</title>{_esc(_short(s.label, int((col_w - 34) / CHAR)))}</text></g>')
        out.append("</g>")
    else:
        out.append(f'<text x="{_f((x0 + x1) / 2)}" y="{_f((y0 + y1) / 2)}" text-anchor="middle" fill="#777">'
                   f"no data</text>")
    out.append("</svg>")
    return "\n".join(out)
