"""Small charts over time, as SVG and as text: per engine busy share, CPU and GPU, and bytes
per second by flow, from :class:`~nbparallel.telemetry.history.History` bins.

Pure string builders, like the rest of the dashboard's drawing: the same SVG shows live in a
widget, stays in a saved notebook (GitHub and nbviewer render it), and :func:`sparkline` is its
terminal form::

    >>> sparkline([0.0, 0.25, 0.5, 1.0])
    ' ▂▄█'
    >>> area_path([0.0, 1.0], width=10, height=4)
    'M0,4 L0.0,4.0 L5.0,4.0 L5.0,0.0 L10.0,0.0 L10,4 Z'
"""

from __future__ import annotations

import html as _html
from typing import Sequence

from ..format import nbytes

__all__ = ["area_path", "line_path", "sparkline", "history_svg", "history_text", "FLOW_COLORS"]

BUSY_COLOR, CPU_COLOR, GPU_COLOR = "#4c78a8", "#e45756", "#54a24b"
#: One colour per flow of the rate chart (``telemetry.history.RATE_FLOWS``).
FLOW_COLORS = {"out": "#4c78a8", "in": "#f58518", "stage": "#54a24b", "comm": "#b279a2"}
_ROW, _PAD, _LABEL, _WIDTH = 22, 4, 96, 300
_BLOCKS = " ▁▂▃▄▅▆▇█"


def area_path(values: Sequence[float], width: float, height: float, top: float = 1.0) -> str:
    """A closed step-shaped area under ``values`` (0..``top``), one step per value."""
    if not values:
        return ""
    w = width / len(values)
    parts = [f"M0,{height:g}"]
    for i, v in enumerate(values):
        y = height - height * min(max(v, 0.0), top) / top if top else height
        parts.append(f"L{i * w:.1f},{y:.1f} L{(i + 1) * w:.1f},{y:.1f}")
    parts.append(f"L{width:g},{height:g} Z")
    return " ".join(parts)


def line_path(values: Sequence[float | None], width: float, height: float,
              top: float = 1.0) -> str:
    """A line through ``values`` (bin centres), broken where a value is None."""
    if not values:
        return ""
    w = width / len(values)
    parts, pen = [], "M"
    for i, v in enumerate(values):
        if v is None:
            pen = "M"
            continue
        y = height - height * min(max(v, 0.0), top) / top if top else height
        parts.append(f"{pen}{(i + 0.5) * w:.1f},{y:.1f}")
        pen = "L"
    return " ".join(parts)


def sparkline(values: Sequence[float | None], width: int | None = None, top: float = 1.0) -> str:
    """``values`` (0..``top``) as block characters, averaged down to ``width`` columns."""
    vals = list(values)
    if width is not None and len(vals) > width:
        per = len(vals) / width
        cols = []
        for c in range(width):
            chunk = [v for v in vals[int(c * per):int((c + 1) * per)] if v is not None]
            cols.append(sum(chunk) / len(chunk) if chunk else None)
        vals = cols
    out = []
    for v in vals:
        if v is None or not top:
            out.append(" ")
            continue
        share = min(max(v / top, 0.0), 1.0)
        out.append(_BLOCKS[round(share * (len(_BLOCKS) - 1))])
    return "".join(out)


def history_svg(rows: Sequence[tuple[str, list[float], list[float | None], list[float | None]]],
                rates: dict[str, list[float]], step: float) -> str:
    """One row per engine (``(label, busy shares, CPU %, GPU %)``: busy as an area, CPU and GPU
    as lines, 100% at the top), then bytes per second by flow as lines under one scale."""
    cpu_top = max([100.0] + [v for _, _, cpu, _ in rows for v in cpu if v is not None])
    out = []
    y = 0
    for label, busy, cpu, gpu in rows:
        now_busy = next((v for v in reversed(busy) if v), 0.0)
        parts = [f'<text x="{_LABEL - 6}" y="{_ROW - 6}" text-anchor="end" '
                 f'fill="currentColor">{_html.escape(label)}</text>',
                 f'<rect x="{_LABEL}" width="{_WIDTH}" height="{_ROW}" fill="none" '
                 f'stroke="currentColor" stroke-opacity="0.15"/>',
                 f'<g transform="translate({_LABEL},0)">'
                 f'<path class="nbp-busy" d="{area_path(busy, _WIDTH, _ROW)}" fill="{BUSY_COLOR}" '
                 f'fill-opacity="0.45"><title>busy share, {step:g} s bins</title></path>',
                 f'<path class="nbp-cpu" d="{line_path(cpu, _WIDTH, _ROW, cpu_top)}" fill="none" '
                 f'stroke="{CPU_COLOR}" stroke-width="1.2"><title>CPU % (top: '
                 f'{cpu_top:.0f}%)</title></path>']
        if any(v is not None for v in gpu):
            parts.append(f'<path class="nbp-gpu" d="{line_path(gpu, _WIDTH, _ROW, 100.0)}" '
                         f'fill="none" stroke="{GPU_COLOR}" stroke-width="1.2"/>')
        parts.append("</g>")
        parts.append(f'<text x="{_LABEL + _WIDTH + 6}" y="{_ROW - 6}" fill="currentColor">'
                     f"{now_busy:.0%}</text>")
        out.append(f'<g class="nbp-history-row" transform="translate(0,{y})">{"".join(parts)}</g>')
        y += _ROW + _PAD
    top = max([1.0] + [v for series in rates.values() for v in series])
    lines = [f'<path class="nbp-rate" data-flow="{flow}" d="{line_path(series, _WIDTH, 40, top)}" '
             f'fill="none" stroke="{FLOW_COLORS.get(flow, "#999")}" stroke-width="1.2"/>'
             for flow, series in rates.items() if any(series)]
    legend = "  ".join(f'<tspan fill="{FLOW_COLORS.get(f, "#999")}">&#9632;</tspan> {f}'
                       for f in rates)
    out.append(f'<g transform="translate(0,{y})">'
               f'<text x="{_LABEL - 6}" y="24" text-anchor="end" fill="currentColor">bytes/s</text>'
               f'<rect x="{_LABEL}" width="{_WIDTH}" height="40" fill="none" '
               f'stroke="currentColor" stroke-opacity="0.15"/>'
               f'<g transform="translate({_LABEL},0)">{"".join(lines)}</g>'
               f'<text x="{_LABEL + _WIDTH + 6}" y="10" fill="currentColor">'
               f"{nbytes(int(top))}/s</text>"
               f'<text x="{_LABEL}" y="54" fill="currentColor">{legend}</text></g>')
    height = y + 60
    width = _LABEL + _WIDTH + 60
    return (f'<svg class="nbp-history" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">{"".join(out)}</svg>')


def history_text(rows: Sequence[tuple[str, list[float], list[float | None], list[float | None]]],
                 rates: dict[str, list[float]], cols: int = 48) -> list[str]:
    """The same as lines of block characters, ``cols`` wide."""
    width = max([len(label) for label, *_ in rows] + [7])
    out = []
    for label, busy, cpu, _ in rows:
        top = max([100.0] + [v for v in cpu if v is not None])
        out.append(f"  {label:>{width}} busy |{sparkline(busy, cols)}|  CPU |"
                   f"{sparkline(cpu, cols, top)}|")
    peak = max([0.0] + [v for series in rates.values() for v in series])
    for flow, series in rates.items():
        if any(series):
            out.append(f"  {'bytes/s':>{width}} {flow:>4} |{sparkline(series, cols, peak)}|"
                       f"  (top {nbytes(int(peak))}/s)")
    return out
