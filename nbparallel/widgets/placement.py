"""Where the data lives: shards of a kept value, and pipeline stage parameters, drawn.

Like JAX's ``visualize_array_sharding``: :class:`Placement` draws the rows ``[0, total)`` of a value
split along one axis as one horizontal bar, each shard a block coloured by its engine and labelled
with the engine, its rows, bytes and device; :func:`stage_map` draws pipeline stages as a grid of
stages by data-parallel replicas, each cell the engines (tensor ranks) that hold the stage. In a
notebook both show as inline SVG with a one-line caption and a table; in a terminal as text.

Pure: rows of plain dicts in, strings out (no engines, no ipywidgets). ``Resident.placement()``
returns a :class:`Placement`::

    y.placement()          # in a notebook: the bar, caption and table
    print(y.placement())   # in a terminal: the text below

>>> p = Placement([{"engine": 0, "rank": 0, "rows": (0, 4), "bytes": 32, "device": "cpu"},
...                {"engine": 1, "rank": 1, "rows": (4, 7), "bytes": 24, "device": "cpu"},
...                {"engine": 2, "rank": 2, "rows": (7, 10), "bytes": 24, "device": "cpu", "lost": True}],
...               title="y: (10,) float64, axis 0")
>>> print(p)
y: (10,) float64, axis 0: 10 rows in 3 shards on engines 0-2, 80 B; 1 lost with engine(s) 2
  [0000111///]
  engine 0  rows 0-3  32 B  cpu
  engine 1  rows 4-6  24 B  cpu
  engine 2  rows 7-9  24 B  cpu  lost
>>> p[1]["rows"], p.total_rows
((4, 7), 10)
"""

from __future__ import annotations

import html as _html
import itertools
from typing import Any, Iterable, Mapping

from ..format import nbytes, ranges

__all__ = ["Placement", "StageMap", "stage_map"]

SVG_WIDTH = 720
#: One colour per engine (Tableau 10, as the dashboard uses), cycled by engine id.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
LOST = "#d3d3d3"  # the fill of a lost shard, under a hatch
BAR_COLS = 64  # characters of the text bar, at most (fewer when there are fewer rows)
#: The text bar's key, one character a shard, when engine ids are not single digits.
SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

_FONT = "font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px;"  # as the dashboard
_CELL = "padding: 1px 8px; text-align: right;"
_PAD = 8  # px left and right of the bar
_BLOCK = 44  # px: a block's height, three 11 px lines of label
_CHAR = 6.6  # px a character of the 11 px label font, about
_ids = itertools.count()  # each SVG's hatch pattern gets its own id: several share one page


class _Drawing(list):
    """A list of row dicts that draws itself: HTML in a notebook, text in a terminal. Its
    subclasses define ``html()`` and ``text()``."""

    title: str

    def _repr_html_(self) -> str:
        return self.html()

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())


class Placement(_Drawing):
    """Where each shard of a value lives: a list of row dicts, one per shard, that draws itself.

    Each row has ``engine``, ``rank``, ``rows`` (``(lo, hi)`` along the split axis, or None when
    the shard's rows are not counted) and ``bytes``; it may have ``device`` (``"cpu"``,
    ``"cuda:0 NVIDIA H200"``) and ``lost`` (True: the engine stopped, and the shard with it).
    ``title`` names the value; ``total_rows`` defaults to the end of the last shard's rows.
    It is a plain ``list`` otherwise: index it, iterate it, compare it.

    >>> p = Placement([{"engine": 3, "rank": 0, "rows": (0, 2), "bytes": 16},
    ...                {"engine": 5, "rank": 1, "rows": (2, 3), "bytes": 8}], title="x")
    >>> len(p), p.total_rows, [r["engine"] for r in p]
    (2, 3, [3, 5])
    >>> print(p.text().splitlines()[1])
      [335]
    >>> '<g class="nbp-shard" data-engine="5"' in p._repr_html_()
    True
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]] = (), *, title: str = "",
                 total_rows: int | None = None):
        super().__init__(rows)
        self.title = title
        if total_rows is None and self and all(r.get("rows") is not None for r in self):
            total_rows = max(r["rows"][1] for r in self)
        self.total_rows = total_rows

    @property
    def _by_rows(self) -> bool:
        return self.total_rows is not None and all(r.get("rows") is not None for r in self)

    def caption(self) -> str:
        """The one line above the drawing: the title, rows, shards, engines and bytes.

        >>> Placement([{"engine": 0, "rank": 0, "rows": (0, 5), "bytes": 40}], title="a").caption()
        'a: 5 rows in 1 shard on engine 0, 40 B'
        """
        n = len(self)
        engines = [r["engine"] for r in self]
        head = f"{self.title}: " if self.title else ""
        rows = f"{self.total_rows:,} rows" if self._by_rows else "rows not counted (widths by bytes)"
        where = (f"engine{'s' if len(set(engines)) != 1 else ''} {ranges(engines)}" if engines
                 else "no engines")
        line = (f"{head}{rows} in {n} shard{'s' if n != 1 else ''} on {where}, "
                f"{nbytes(sum(r.get('bytes') or 0 for r in self))}")
        lost = [r["engine"] for r in self if r.get("lost")]
        if lost:
            line += f"; {len(lost)} lost with engine(s) {ranges(lost)}"
        return line

    def text(self) -> str:
        """The text version: the caption, a bar of characters (one per row while there are at most
        :data:`BAR_COLS` rows; ``/`` where a shard is lost), and one line per shard.

        >>> p = Placement([{"engine": 0, "rank": 0, "rows": (0, 2), "bytes": 16, "device": "cpu"},
        ...                {"engine": 1, "rank": 1, "rows": (2, 6), "bytes": 32, "device": "cpu"}])
        >>> print(p.text())
        6 rows in 2 shards on engines 0-1, 48 B
          [001111]
          engine 0  rows 0-1  16 B  cpu
          engine 1  rows 2-5  32 B  cpu
        """
        symbols = _symbols(self)
        coded = any(s != str(r["engine"]) for s, r in zip(symbols, self))
        cols = self.total_rows if self._by_rows and 0 < self.total_rows <= BAR_COLS else BAR_COLS
        bar = "".join(("/" if r.get("lost") else s) * w
                      for s, r, w in zip(symbols, self, _widths(_weights(self), cols)))
        lines = [self.caption()]
        if self:
            lines.append(f"  [{bar}]")
        device = any(r.get("device") for r in self)
        table = [([f"{s}:"] if coded else [])
                 + [f"engine {r['engine']}", _rows_text(r.get("rows")), nbytes(r.get("bytes"))]
                 + ([str(r.get("device") or "")] if device else [])
                 + (["lost"] if r.get("lost") else []) for s, r in zip(symbols, self)]
        lines += _columns(table, right=(2 + coded,))
        return "\n".join(lines)

    def svg(self) -> str:
        """The bar alone, as an ``<svg>`` element: a block per shard (class ``nbp-shard``, with
        ``data-engine``, ``data-lo`` and ``data-hi`` (its rows ``[lo, hi)``) and ``data-lost``),
        and the row numbers where shards meet.

        >>> p = Placement([{"engine": 0, "rank": 0, "rows": (0, 10), "bytes": 80}])
        >>> p.svg().startswith('<svg class="nbp-placement-bar"')
        True
        """
        hatch = f"nbp-hatch-{next(_ids)}"
        width = SVG_WIDTH - 2 * _PAD
        weights = _weights(self)
        total = sum(weights)
        blocks, ticks, x, last_tick = [], [], float(_PAD), -1e9
        for r, w in zip(self, weights):
            dx = width * w / total if total else width / max(len(self), 1)
            lost = bool(r.get("lost"))
            device = str(r.get("device") or "")
            lines = [f"engine {r['engine']}", _rows_text(r.get("rows")),
                     "lost" if lost else " · ".join(filter(None, [nbytes(r.get("bytes")),
                                                                 device.split(" ")[0]]))]
            tip = "; ".join(filter(None, [f"engine {r['engine']}", f"rank {r.get('rank')}",
                                          _rows_text(r.get("rows")), nbytes(r.get("bytes")),
                                          device, "lost" if lost else ""]))
            fill = LOST if lost else _color(r["engine"])
            parts = [f'<title>{_html.escape(tip)}</title>',
                     f'<rect x="{x:.1f}" width="{max(dx, 1.0):.1f}" height="{_BLOCK}" fill="{fill}" '
                     f'stroke="#fff" stroke-width="1"/>']
            if lost:
                parts.append(f'<rect x="{x:.1f}" width="{max(dx, 1.0):.1f}" height="{_BLOCK}" '
                             f'fill="url(#{hatch})"/>')
            ink = "#333" if lost else "#fff"
            for i, line in enumerate(_fit(lines, dx)):
                weight = ' font-weight="bold"' if i == 0 else ""
                parts.append(f'<text x="{x + dx / 2:.1f}" y="{13 + 12 * i}" text-anchor="middle" '
                             f'fill="{ink}"{weight}>{_html.escape(line)}</text>')
            span = "" if r.get("rows") is None else f'data-lo="{r["rows"][0]}" data-hi="{r["rows"][1]}" '
            blocks.append(f'<g class="nbp-shard{" nbp-lost" if lost else ""}" data-engine="{r["engine"]}" '
                          f'{span}data-lost="{str(lost).lower()}">{"".join(parts)}</g>')
            if self._by_rows and x - last_tick >= 7 * len(str(r["rows"][0])) + 6:
                ticks.append(_tick(x, r["rows"][0], "start" if not ticks else "middle"))
                last_tick = x
            x += dx
        if self._by_rows and self and x - last_tick >= 7 * len(str(self.total_rows)) + 6:
            ticks.append(_tick(x, self.total_rows, "end"))
        height = _BLOCK + 16
        defs = _hatch_defs(hatch)
        return (f'<svg class="nbp-placement-bar" xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" '
                f'height="{height}" viewBox="0 0 {SVG_WIDTH} {height}" style="font: 11px sans-serif;">'
                f'{defs}{"".join(blocks)}{"".join(ticks)}</svg>')

    def html(self) -> str:
        """Static HTML: the caption, the bar (:meth:`svg`) and a table of the shards, in a
        ``nbp-placement`` div (well-formed XML too).

        >>> Placement([{"engine": 0, "rank": 0, "rows": (0, 1), "bytes": 8}]).html()[:39]
        '<div class="nbp-placement" style="font-'
        """
        device = any(r.get("device") for r in self)
        head = ["engine", "rank", "rows", "bytes"] + (["device"] if device else []) + [""]
        rows = [[f'<span style="display: inline-block; width: 9px; height: 9px; background: '
                 f'{LOST if r.get("lost") else _color(r["engine"])};"></span> {r["engine"]}',
                 str(r.get("rank", "")), _rows_text(r.get("rows")), nbytes(r.get("bytes"))]
                + ([_html.escape(str(r.get("device") or ""))] if device else [])
                + (["lost"] if r.get("lost") else [""]) for r in self]
        return (f'<div class="nbp-placement" style="{_FONT}">'
                f'<div class="nbp-caption">{_html.escape(self.caption())}</div>{self.svg()}'
                f'{_table("nbp-placement-table", head, rows, [r["engine"] for r in self])}</div>')


class StageMap(_Drawing):
    """Pipeline stage parameters, where they live: the rows :func:`stage_map` was given, drawn as
    a grid of stages (down) by data-parallel replicas (across). A plain ``list`` otherwise.

    >>> m = StageMap([{"stage": "s0", "engine": 0, "replica": 0, "bytes": 64}], title="model")
    >>> m.stages, m.replicas
    (['s0'], [0])
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]] = (), *, title: str = "pipeline stages"):
        super().__init__(rows)
        self.title = title

    @property
    def stages(self) -> list[Any]:
        """Stage names, in the order their first row came."""
        return list(dict.fromkeys(r["stage"] for r in self))

    @property
    def replicas(self) -> list[int]:
        """Replica numbers, sorted (a row without one is replica 0)."""
        return sorted({_replica(r) for r in self})

    def cell(self, stage: Any, replica: int) -> list[Mapping[str, Any]]:
        """The rows of one stage's replica, by tensor rank then engine.

        >>> m = stage_map([{"stage": 0, "engine": 2, "tp_rank": 1}, {"stage": 0, "engine": 1, "tp_rank": 0}])
        >>> [r["engine"] for r in m.cell(0, 0)]
        [1, 2]
        """
        return sorted((r for r in self if r["stage"] == stage and _replica(r) == replica),
                      key=lambda r: (r.get("tp_rank") if r.get("tp_rank") is not None else -1, r["engine"]))

    def caption(self) -> str:
        """The one line above the grid.

        >>> stage_map([{"stage": "a", "engine": 0, "bytes": 8}]).caption()
        'pipeline stages: 1 stage x 1 replica on engine 0, 8 B'
        """
        s, d = len(self.stages), len(self.replicas)
        engines = [r["engine"] for r in self]
        line = (f"{self.title}: {s} stage{'s' if s != 1 else ''} x {d} replica{'s' if d != 1 else ''} "
                f"on engine{'s' if len(set(engines)) != 1 else ''} {ranges(engines)}, "
                f"{nbytes(sum(r.get('bytes') or 0 for r in self))}")
        tp = max((len(self.cell(st, rep)) for st in self.stages for rep in self.replicas), default=0)
        if tp > 1:
            line += f", up to {tp} tensor ranks a stage"
        lost = [r["engine"] for r in self if r.get("lost")]
        if lost:
            line += f"; lost with engine(s) {ranges(lost)}"
        return line

    def text(self) -> str:
        """The caption and one line per stage: each replica's engines (tensor ranks), bytes, device.

        >>> print(stage_map([{"stage": "s0", "engine": 0, "replica": 0, "bytes": 8, "device": "cpu"},
        ...                  {"stage": "s0", "engine": 1, "replica": 1, "bytes": 8, "device": "cpu"},
        ...                  {"stage": "s1", "engine": 2, "replica": 0, "bytes": 4, "device": "cpu"},
        ...                  {"stage": "s1", "engine": 3, "replica": 1, "bytes": 4, "lost": True}]).text())
        pipeline stages: 2 stages x 2 replicas on engines 0-3, 24 B; lost with engine(s) 3
          stage   replica 0          replica 1
          s0      engine 0 8 B cpu   engine 1 8 B cpu
          s1      engine 2 4 B cpu   engine 3 4 B lost
        """
        reps = self.replicas
        table = [["stage"] + [f"replica {d}" for d in reps]]
        table += [[str(st)] + ["; ".join(_entry_text(r) for r in self.cell(st, d)) or "-" for d in reps]
                  for st in self.stages]
        return "\n".join([self.caption()] + (_columns(table, gap=3) if self else []))

    def svg(self) -> str:
        """The grid alone, as an ``<svg>``: per stage a row (``nbp-stage``, ``data-stage``), per
        replica a column, in each cell a block per engine (``nbp-shard``, ``data-engine``).

        >>> stage_map([{"stage": "s0", "engine": 0}]).svg().count('class="nbp-shard"')
        1
        """
        hatch = f"nbp-hatch-{next(_ids)}"
        stages, reps = self.stages, self.replicas
        label = max([72] + [int(_CHAR * len(str(s))) + 14 for s in stages])
        col = (SVG_WIDTH - label - _PAD) / max(len(reps), 1)
        head = "".join(f'<text x="{label + col * (i + 0.5):.1f}" y="11" text-anchor="middle" '
                       f'fill="currentColor">replica {d}</text>' for i, d in enumerate(reps))
        rows = []
        for j, st in enumerate(stages):
            y = 16 + j * (_BLOCK + 4)
            parts = [f'<text x="{label - 6}" y="{_BLOCK / 2 + 4:.0f}" text-anchor="end" '
                     f'fill="currentColor">{_html.escape(str(st))}</text>']
            for i, d in enumerate(reps):
                cell = self.cell(st, d)
                x0 = label + col * i
                parts.append(f'<rect x="{x0 + 1:.1f}" width="{col - 2:.1f}" height="{_BLOCK}" fill="none" '
                             f'stroke="#8884"/>')
                w = (col - 2) / max(len(cell), 1)
                for k, r in enumerate(cell):
                    parts.append(_stage_block(r, x0 + 1 + k * w, w, hatch))
            rows.append(f'<g class="nbp-stage" data-stage="{_html.escape(str(st))}" '
                        f'transform="translate(0,{y})">{"".join(parts)}</g>')
        height = 16 + len(stages) * (_BLOCK + 4)
        defs = _hatch_defs(hatch)
        return (f'<svg class="nbp-stage-map" xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" '
                f'height="{height}" viewBox="0 0 {SVG_WIDTH} {height}" style="font: 11px sans-serif;">'
                f'{defs}{head}{"".join(rows)}</svg>')

    def html(self) -> str:
        """Static HTML: the caption, the grid (:meth:`svg`) and a table of every row, in a
        ``nbp-stage-map`` div (well-formed XML too).

        >>> stage_map([{"stage": "s0", "engine": 0}]).html()[:38]
        '<div class="nbp-stage-map" style="font'
        """
        tp = any(r.get("tp_rank") is not None for r in self)
        device = any(r.get("device") for r in self)
        head = (["stage", "replica"] + (["tensor rank"] if tp else []) + ["engine", "bytes"]
                + (["device"] if device else []) + [""])
        ordered = [r for st in self.stages for d in self.replicas for r in self.cell(st, d)]
        rows = [[_html.escape(str(r["stage"])), str(_replica(r))]
                + ([str(r.get("tp_rank") if r.get("tp_rank") is not None else "")] if tp else [])
                + [str(r["engine"]), nbytes(r.get("bytes"))]
                + ([_html.escape(str(r.get("device") or ""))] if device else [])
                + (["lost" if r.get("lost") else ""]) for r in ordered]
        return (f'<div class="nbp-stage-map" style="{_FONT}">'
                f'<div class="nbp-caption">{_html.escape(self.caption())}</div>{self.svg()}'
                f'{_table("nbp-stage-table", head, rows, [r["engine"] for r in ordered])}</div>')


def stage_map(rows: Iterable[Mapping[str, Any]], title: str = "pipeline stages") -> StageMap:
    """Draw where pipeline stages' parameters live. ``rows``: one dict per engine holding a stage,
    with ``stage`` (its name), ``engine``, and optionally ``replica`` (data-parallel replica,
    default 0), ``tp_rank`` (tensor rank), ``bytes``, ``device`` and ``lost``.

    >>> m = stage_map([{"stage": "s0", "engine": 0, "replica": 0, "tp_rank": 0, "bytes": 32},
    ...                {"stage": "s0", "engine": 1, "replica": 0, "tp_rank": 1, "bytes": 32}])
    >>> print(m)
    pipeline stages: 1 stage x 1 replica on engines 0-1, 64 B, up to 2 tensor ranks a stage
      stage   replica 0
      s0      engine 0 t0 32 B; engine 1 t1 32 B
    """
    return StageMap(rows, title=title)


# ----------------------------------------------------------------------------------------------------
# Pieces


def _hatch_defs(hatch: str) -> str:
    """The diagonal hatching lost shards are drawn with, under the id ``hatch``."""
    return (f'<defs><pattern id="{hatch}" width="6" height="6" patternUnits="userSpaceOnUse" '
            f'patternTransform="rotate(45)"><rect width="1.5" height="6" fill="#999"/></pattern></defs>')


def _color(engine: int) -> str:
    return PALETTE[engine % len(PALETTE)]


def _replica(row: Mapping[str, Any]) -> int:
    return row.get("replica") or 0


def _rows_text(rows: tuple[int, int] | None) -> str:
    """``rows 3-5`` for (3, 6), as error messages write them; ``row 3``, ``no rows``, ``rows ?``."""
    if rows is None:
        return "rows ?"
    lo, hi = rows
    return "no rows" if hi <= lo else f"row {lo}" if hi - lo == 1 else f"rows {lo}-{hi - 1}"


def _entry_text(r: Mapping[str, Any]) -> str:
    tp = f" t{r['tp_rank']}" if r.get("tp_rank") is not None else ""
    size = f" {nbytes(r['bytes'])}" if r.get("bytes") is not None else ""
    state = " lost" if r.get("lost") else f" {r['device']}" if r.get("device") else ""
    return f"engine {r['engine']}{tp}{size}{state}"


def _weights(p: Placement) -> list[float]:
    """How wide each shard is drawn: its rows, or (rows not counted) its bytes, or all alike."""
    if p._by_rows:
        return [max(r["rows"][1] - r["rows"][0], 0) for r in p]
    sizes = [float(r.get("bytes") or 0) for r in p]
    return sizes if sum(sizes) > 0 else [1.0] * len(p)


def _widths(weights: list[float], cols: int) -> list[int]:
    """Characters per shard summing to about ``cols``: cut where the cumulative weight falls, and at
    least one for a shard with any weight (so none vanishes; the bar may grow by a few)."""
    total = sum(weights)
    if total <= 0:
        return [0] * len(weights)
    out, cum, last = [], 0.0, 0
    for w in weights:
        cum += w
        edge = round(cum * cols / total)
        out.append(max(edge - last, 1 if w > 0 else 0))
        last = max(edge, last + out[-1])
    return out


def _symbols(p: Placement) -> list[str]:
    """The bar's character for each shard: its engine id when every id is one digit, else a key
    (``a-zA-Z`` by shard, each shard's line starting with it)."""
    if all(0 <= r["engine"] <= 9 for r in p):
        return [str(r["engine"]) for r in p]
    return [SYMBOLS[i % len(SYMBOLS)] for i in range(len(p))]


def _fit(lines: list[str], width: float) -> list[str]:
    """The label lines that fit a block ``width`` px wide, each shortened when it must (``engine 12``
    to ``12``, ``rows 0-99`` to ``0-99``, ``8 B · cpu`` to ``8 B``);
    the lines after one that does not fit at all are left out (the tooltip has them all)."""
    room = (width - 6) / _CHAR
    out = []
    for line in lines:
        short = line.split(" · ")[0] if " · " in line else line.split(" ")[-1]
        if len(line) <= room:
            out.append(line)
        elif len(short) <= room:
            out.append(short)
        else:
            break
    return out


def _tick(x: float, value: int, anchor: str) -> str:
    return (f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_BLOCK}" y2="{_BLOCK + 4}" stroke="currentColor"/>'
            f'<text x="{x:.1f}" y="{_BLOCK + 14}" text-anchor="{anchor}" fill="currentColor">{value}</text>')


def _stage_block(r: Mapping[str, Any], x: float, w: float, hatch: str) -> str:
    lost = bool(r.get("lost"))
    fill = LOST if lost else _color(r["engine"])
    tp = f"t{r['tp_rank']}" if r.get("tp_rank") is not None else ""
    device = str(r.get("device") or "")
    size = nbytes(r["bytes"]) if r.get("bytes") is not None else ""
    lines = [f"engine {r['engine']}", " · ".join(filter(None, [tp, size])),
             "lost" if lost else device.split(" ")[0]]
    lines = [line for line in lines if line]
    tip = "; ".join(filter(None, [f"stage {r['stage']}", f"replica {_replica(r)}", f"engine {r['engine']}",
                                  f"tensor rank {r['tp_rank']}" if tp else "", size, device,
                                  "lost" if lost else ""]))
    parts = [f'<title>{_html.escape(tip)}</title>',
             f'<rect x="{x:.1f}" width="{w:.1f}" height="{_BLOCK}" fill="{fill}" stroke="#fff" '
             f'stroke-width="1"/>']
    if lost:
        parts.append(f'<rect x="{x:.1f}" width="{w:.1f}" height="{_BLOCK}" fill="url(#{hatch})"/>')
    ink = "#333" if lost else "#fff"
    for i, line in enumerate(_fit(lines, w)):
        weight = ' font-weight="bold"' if i == 0 else ""
        parts.append(f'<text x="{x + w / 2:.1f}" y="{13 + 12 * i}" text-anchor="middle" fill="{ink}"{weight}>'
                     f'{_html.escape(line)}</text>')
    return (f'<g class="nbp-shard{" nbp-lost" if lost else ""}" data-engine="{r["engine"]}" '
            f'data-tp="{tp[1:]}" data-lost="{str(lost).lower()}">{"".join(parts)}</g>')


def _table(cls: str, head: list[str], rows: list[list[str]], keys: list[Any]) -> str:
    th = "".join(f'<th style="{_CELL}">{_html.escape(h)}</th>' for h in head)
    body = "".join(f'<tr data-engine="{k}">' + "".join(f'<td style="{_CELL}">{c}</td>' for c in r) + "</tr>"
                   for k, r in zip(keys, rows))
    return (f'<table class="{cls}" style="{_FONT} border-collapse: collapse; margin: 4px 0;">'
            f"<tr>{th}</tr>{body}</table>")


def _columns(rows: list[list[str]], right: tuple[int, ...] = (), gap: int = 2) -> list[str]:
    """Rows of cells as aligned text lines, columns in ``right`` right-aligned."""
    if not rows:
        return []
    n = max(len(r) for r in rows)
    widths = [max((len(r[i]) for r in rows if i < len(r)), default=0) for i in range(n)]
    sep = " " * gap
    return ["  " + sep.join(c.rjust(w) if i in right else c.ljust(w)
                            for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
