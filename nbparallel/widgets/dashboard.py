"""The live dashboard: per-engine load, bytes moved, and the pipeline timeline with its bubbles.

One :class:`Dashboard` is fed new telemetry records and redraws at most four times a second. In a
Jupyter kernel it is a column of ``ipywidgets.HTML`` views (inline SVG for bars and the timeline);
when the work is done, :meth:`Dashboard.finish` replaces them with static HTML, so a saved
notebook still shows the final state on GitHub or nbviewer. Outside a kernel it prints text::

    dash = Dashboard(pool.ids, title="%%pmap")
    dash.show()
    while running:
        dash.feed(transfers=new_transfers, spans=new_spans, samples=new_samples)
        dash.tick()                      # coalesced: redraws only every >= 0.25 s, and only on change
    dash.pipeline(run_id, "1f1b", theory=0.27, peak_stash={0: 4, 1: 3, 2: 2, 3: 1})
    dash.finish()

Browser tests find ``.nbp-dashboard .nbp-summary``, whose ``data-engines`` is the number of engines
and ``data-bytes`` the bytes of every transfer fed so far; ``data-redraws`` changes on every redraw.
"""

from __future__ import annotations

import html as _html
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..format import nbytes, seconds
from .charts import history_svg, history_text
from ..telemetry.records import Sample, Span, Transfer
from ..telemetry.reduce import PipelineView, Telemetry, flow
from ..telemetry.trace import span_name
from .progress import _in_kernel

__all__ = ["Dashboard", "MIN_INTERVAL"]

MIN_INTERVAL = 0.25  # seconds between redraws: 2-4 updates a second is live enough, and cheap to send
BUSY_WINDOW = 5.0  # seconds of history behind each busy fraction
RATE_WINDOW = 1.0  # seconds behind the "... /s now" rate
SVG_WIDTH = 720
_LABEL = 72  # px for the row labels left of the timeline
_ROW, _PAD = 16, 4
_MAX_TITLES = 1500  # tooltips only while the SVG stays small
_JOIN_PX = 3.0  # narrower ops are drawn joined with their neighbours

#: Fill colours per span kind (Tableau 10), and the bubble shade.
COLORS = {"F": "#4e79a7", "B": "#59a14f", "I": "#f28e2b", "W": "#b07aa1", "step": "#79706e",
          "scatter": "#76b7b2", "pmap": "#edc948", "comm": "#ff9da7"}
BUBBLE = "#e15759"
_MAX_INFOS = 256  # pipeline() announcements remembered

_FONT = "font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px;"
_CELL = "padding: 1px 8px; text-align: right;"


@dataclass(frozen=True)
class _Info:
    schedule: str
    theory: float | None
    peak_stash: dict[int, int]
    labels: tuple[tuple[int, str], ...] = ()  # (engine, its place in the layout)


class Dashboard:
    """Per-engine load, transfer volume and pipeline bubbles, redrawn from fed telemetry.

    ``engines`` are the engine ids to list (engines seen in records are added). With ``live`` in a
    Jupyter kernel, :meth:`show` displays ipywidgets that :meth:`tick` updates; otherwise nothing
    is drawn until :meth:`show` or :meth:`finish`. ``clock`` (seconds, the records' clock) is for tests.

    >>> dash = Dashboard([0, 1], live=False, clock=lambda: 100.0)
    >>> dash.feed(transfers=[Transfer(0, "scatter", "out", "shm", 2 * 2**20, 99.5)])
    >>> print(dash.text().splitlines()[0])
    nbparallel: 2 engines, 2.0 MiB moved, 2.0 MiB/s now
    """

    def __init__(self, engines: list[int], *, title: str = "nbparallel", live: bool = True,
                 clock: Callable[[], float] = time.time):
        self.title = title
        self.telemetry = Telemetry(engines)
        self._order = list(dict.fromkeys(engines))
        self._clock = clock
        # What pipeline() said about each run, newest last; bounded like the telemetry.
        self._infos: OrderedDict[str, _Info] = OrderedDict()
        self._pipe_cache: tuple[Any, str] | None = None  # (what it shows, its html): SVG is costly
        self._dirty = False
        self._checked = -math.inf  # when tick last looked
        self.redraws = 0
        self._shown: dict[str, str] = {}
        self._handles: list[Any] = []
        self._printed = False
        self._finished = False
        self._widgets: dict[str, Any] = {}
        self._root: Any = None
        self._panel: Any = None  # the side panel it is shown in, if any
        if live and _in_kernel():
            self._build_widgets()

    # -- input -----------------------------------------------------------------------------------
    def feed(self, transfers: Iterable[Transfer] = (), spans: Iterable[Span] = (),
             samples: Iterable[Sample] = ()) -> None:
        """Add the records that are new since the last feed (a ring's ``since(cursor)``)."""
        if self.telemetry.ingest(transfers, spans, samples):
            self._dirty = True

    def pipeline(self, run: str, schedule: str, theory: float | None,
                 peak_stash: dict[int, int], labels: dict[int, str] | None = None) -> None:
        """What to show beside pipeline run ``run``'s measured bubble: its ``schedule``, ``theory``
        (the schedule's theoretical bubble fraction) and the peak activation stash per stage.

        The timeline shows the newest pipeline run whose spans came through :meth:`feed`, drawn as
        they arrive, so a run can be announced before, during or after its spans; announcing runs
        whose spans never come (older runs) shows nothing for them.
        """
        self._infos.pop(run, None)
        self._infos[run] = _Info(schedule, theory, dict(peak_stash),
                                 tuple(sorted((labels or {}).items())))
        while len(self._infos) > _MAX_INFOS:
            self._infos.popitem(last=False)
        self._dirty = True

    # -- drawing ---------------------------------------------------------------------------------
    def tick(self, force: bool = False) -> bool:
        """Redraw if at least :data:`MIN_INTERVAL` passed since the last look and something changed
        (new records, a new pipeline, or busy fractions that decayed); returns whether it redrew.
        ``force`` skips the interval (a magic just ended: its last records must show)."""
        if self._finished:
            return False
        now = self._clock()
        if not force and 0 <= now - self._checked < MIN_INTERVAL:  # a clock that went back must not stall us
            return False
        self._checked = now
        if not self._dirty and _load_html(self, now) == self._shown.get("load"):
            return False
        self._redraw(now)
        return True

    def finish(self) -> None:
        """Final redraw. In a kernel, leave static HTML (with inline SVG) of the final state as the
        display output and close the widgets; in a terminal, print the final text if shown."""
        if self._finished:
            return
        now = self._clock()
        self._redraw(now)
        self._finished = True
        if _in_kernel():
            bundle = {"text/html": self._page(self._shown), "text/plain": self.text()}
            if self._handles:
                for handle in self._handles:
                    handle.update(bundle, raw=True)
            else:
                _display(bundle, raw=True)
        elif self._printed:
            print(self.text())
        if self._root is not None:
            for w in self._widgets.values():
                w.close()
            self._root.close()
            self._root = None
            self._widgets = {}

    def html(self) -> str:
        """Static HTML of the current state: the ``nbp-dashboard`` div with tables and inline SVG."""
        return self._page(self._sections(self._clock()))

    def _repr_html_(self) -> str:
        return self.html()

    def text(self) -> str:
        """A plain-text rendering for a terminal."""
        now = self._clock()
        tel = self.telemetry
        engines = self._engines()
        lines = [f"{self.title}: {_summary_text(self, now)}", f"load (last {BUSY_WINDOW:g} s)"]
        gpu = any(tel.latest.get(e) is not None and tel.latest[e].gpu_util is not None for e in engines)
        head = ["engine", "busy", "queued", "CPU"] + (["GPU", "GPU memory"] if gpu else [])
        rows = [head] + [_load_row(e, b, tel.latest.get(e), gpu, html=False)
                         for e, b in _busy(self, now).items()]
        lines += _columns(rows)
        chart = _history_rows(self, now)
        if chart is not None:
            lines.append(f"over the last {_window(self, now)}")
            lines += history_text(*chart)
        lines.append("bytes moved")
        lines += _columns([_VOLUME_HEAD] + _volume_rows(self, html=False), left=(4,))
        matrix = _matrix_rows(self)
        if matrix:
            lines.append(_MATRIX_CAPTION)
            lines += _columns(matrix, left=(0,))
        view = self._view()
        if view is not None:
            info = self._infos.get(view.run)
            lines.append(_pipeline_caption(view, info, view.run in tel.truncated))
            lines += _timeline_text(view, names=_names(view, info))
        return "\n".join(lines)

    def show(self, side: bool = False) -> None:
        """Display the dashboard: live widgets in a kernel, static HTML in a kernel when not live,
        else print the text. ``side``: in a JupyterLab side panel (the ``sidecar`` package, the
        ``nbparallel[monitor]`` extra), beside the notebook rather than under the cell."""
        if side and self._root is not None:
            panel = _side_panel(self.title)
            if panel is not None:
                self._redraw(self._clock())
                with panel:
                    _display(self._root)
                self._panel = panel
                return
        if self._root is not None:
            self._redraw(self._clock())
            self._handles.append(_display(self._root))
        elif _in_kernel():
            self._handles.append(_display({"text/html": self.html(), "text/plain": self.text()},
                                          raw=True))
        else:
            print(self.text())
            self._printed = True

    # -- internals -------------------------------------------------------------------------------
    def _engines(self) -> list[int]:
        return list(dict.fromkeys(self._order + sorted(self.telemetry.engines)))

    def _run(self) -> str | None:
        runs = self.telemetry.runs()  # oldest first, by when their first span arrived
        return runs[-1] if runs else None

    def _view(self) -> PipelineView | None:
        run = self._run()
        return None if run is None else self.telemetry.run(run)

    def _sections(self, now: float) -> dict[str, str]:
        return {"head": _head_html(self, now), "load": _load_html(self, now),
                "history": _history_html(self, now),
                "volume": _volume_html(self), "comm": _matrix_html(self),
                "pipeline": self._pipeline_html()}

    def _pipeline_html(self) -> str:
        run = self._run()
        if run is None:
            return ""
        info = self._infos.get(run)
        key = (run, self.telemetry.run_version(run), info)
        if self._pipe_cache is None or self._pipe_cache[0] != key:
            view = self.telemetry.run(run)
            assert view is not None  # a held run has spans
            cap = _html.escape(_pipeline_caption(view, info, run in self.telemetry.truncated))
            self._pipe_cache = (key, f'<div class="nbp-pipeline" style="{_FONT}"><div>{cap}</div>'
                                     f'{_timeline_svg(view, _names(view, info))}</div>')
        return self._pipe_cache[1]

    def _page(self, sections: dict[str, str]) -> str:
        body = "".join(sections.values())
        return f'<div class="nbp-dashboard nbp-static" style="{_FONT}">{body}</div>'

    def _redraw(self, now: float) -> None:
        self.redraws += 1  # before rendering: the summary carries it, so every redraw changes the DOM
        sections = self._sections(now)
        for name, value in sections.items():
            if self._shown.get(name) != value:
                if name in self._widgets:
                    self._widgets[name].value = value  # only what changed goes over the wire
                self._shown[name] = value
        self._dirty = False

    def _build_widgets(self) -> None:
        import ipywidgets as w

        self._widgets = {name: w.HTML("") for name in
                         ("head", "load", "history", "volume", "comm", "pipeline")}
        self._root = w.VBox(list(self._widgets.values()))
        self._root.add_class("nbp-dashboard")


def _side_panel(title: str) -> Any:
    """A JupyterLab side panel to display into, or None (said) when ``sidecar`` is missing."""
    try:
        from sidecar import Sidecar
    except ImportError:
        print("nbparallel: the side panel needs the sidecar package (`pip install "
              "\"nbparallel[monitor]\"`, then reload JupyterLab); showing the monitor under the "
              "cell instead.")
        return None
    return Sidecar(title=title, anchor="split-right")


def _display(obj: Any, **kwargs: Any) -> Any:
    from IPython.display import display

    return display(obj, display_id=True, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Sections: each a pure function of the dashboard's telemetry, rendered to an HTML string.


def _summary_text(d: Dashboard, now: float) -> str:
    n = len(d._engines())
    rate = d.telemetry.gbps(now, RATE_WINDOW) * 1e9
    return (f"{n} engine{'s' if n != 1 else ''}, {nbytes(d.telemetry.total_bytes)} moved, "
            f"{nbytes(rate)}/s now")


def _head_html(d: Dashboard, now: float) -> str:
    summary = (f'<span class="nbp-summary" data-engines="{len(d._engines())}" '
               f'data-bytes="{d.telemetry.total_bytes}" data-redraws="{d.redraws}">'
               f"{_html.escape(_summary_text(d, now))}</span>")
    return f'<div class="nbp-head" style="{_FONT}"><b>{_html.escape(d.title)}</b> · {summary}</div>'


def _busy(d: Dashboard, now: float) -> dict[int, float]:
    busy = d.telemetry.busy(now, BUSY_WINDOW)
    return {e: busy.get(e, 0.0) for e in d._engines()}


def _load_row(engine: int, busy: float, s: Sample | None, gpu: bool, html: bool) -> list[str]:
    pct = f"{busy:.0%}"
    bar = (f'<svg width="60" height="9" style="vertical-align: middle;"><rect width="60" height="9" '
           f'fill="#8884"/><rect width="{60 * min(busy, 1.0):.1f}" height="9" fill="{COLORS["F"]}"/>'
           f"</svg> {pct}") if html else pct
    row = [str(engine), bar, str(s.queued) if s else "-", f"{s.cpu:.0f}%" if s else "-"]
    if gpu:
        util = f"{s.gpu_util:.0f}%" if s is not None and s.gpu_util is not None else "-"
        mem = "-"
        if s is not None and s.gpu_mem is not None:
            mem = nbytes(s.gpu_mem) + (f" / {nbytes(s.gpu_mem_total)}" if s.gpu_mem_total else "")
        row += [util, mem]
    return row


def _load_html(d: Dashboard, now: float) -> str:
    tel = d.telemetry
    engines = d._engines()
    gpu = any(tel.latest.get(e) is not None and tel.latest[e].gpu_util is not None for e in engines)
    head = ["engine", f"busy (last {BUSY_WINDOW:g} s)", "queued", "CPU"]
    head += ["GPU", "GPU memory"] if gpu else []
    rows = [_load_row(e, b, tel.latest.get(e), gpu, html=True) for e, b in _busy(d, now).items()]
    return _table("nbp-load", "load", head, rows, engines)


def _history_rows(d: Dashboard, now: float) -> tuple[list[Any], dict[str, list[float]]] | None:
    """What the charts over time draw: per engine (label, busy, CPU, GPU) and the byte rates;
    None before anything happened in the window."""
    h = d.telemetry.history
    n = h.shown(now)
    rows = [(f"engine {e}", h.busy(e, now, n), h.cpu(e, now, n), h.gpu(e, now, n))
            for e in d._engines()]
    rates = h.rates(now, n)
    if not any(any(b) or any(v is not None for v in c) for _, b, c, _ in rows) and \
            not any(any(r) for r in rates.values()):
        return None
    return rows, rates


def _history_html(d: Dashboard, now: float) -> str:
    chart = _history_rows(d, now)
    if chart is None:
        return ""
    h = d.telemetry.history
    return (f'<div class="nbp-history-section" style="{_FONT}"><div>over the last '
            f'{_window(d, now)}: busy share (area), CPU % (line), bytes per second by '
            f'kind</div>{history_svg(*chart, h.step)}</div>')


def _window(d: Dashboard, now: float) -> str:
    h = d.telemetry.history
    secs = h.shown(now) * h.step
    return f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.0f} minutes"


_VOLUME_HEAD = ["engine", "to engine", "from engine", "engine to engine", "by kind"]


def _volume_rows(d: Dashboard, html: bool) -> list[list[str]]:
    by = d.telemetry.by_engine()
    rows, total = [], dict.fromkeys(("out", "in", "stage"), 0)
    for e in d._engines():
        per = by.get(e, {})
        flows = dict.fromkeys(("out", "in", "stage"), 0)
        for (kind, direction), n in per.items():
            flows[flow(kind, direction)] += n
            total[flow(kind, direction)] += n
        arrow = {"out": "→", "in": "←"}
        kinds = ", ".join(f"{kind} {'' if flow(kind, direction) == 'stage' else arrow.get(direction, '')}{nbytes(n)}"
                          for (kind, direction), n in sorted(per.items()) if n)
        rows.append([str(e), nbytes(flows["out"]), nbytes(flows["in"]), nbytes(flows["stage"]),
                     _html.escape(kinds) if html else kinds])
    rows.append(["total", nbytes(total["out"]), nbytes(total["in"]), nbytes(total["stage"]), ""])
    return rows


def _volume_html(d: Dashboard) -> str:
    return _table("nbp-volume", "bytes moved (→ to the engine, ← back to the notebook)",
                  _VOLUME_HEAD, _volume_rows(d, html=True), d._engines() + ["total"])


_MATRIX_CAPTION = "engine to engine (comm collectives and pipeline stages; row sends, column receives)"


def _matrix_rows(d: Dashboard) -> list[list[str]]:
    """The comm matrix: bytes each engine sent each other engine, and time in collectives;
    no rows when engines never talked."""
    tel = d.telemetry
    if not tel.pairs and not tel.comm_seconds:
        return []
    engines = [e for e in d._engines()
               if any(e in pair for pair in tel.pairs) or e in tel.comm_seconds]
    rows = [["from \\ to", *map(str, engines), "in collectives"]]
    for src in engines:
        cells = ["-" if src == dst else nbytes(tel.pairs.get((src, dst), 0)) for dst in engines]
        rows.append([str(src), *cells, seconds(tel.comm_seconds.get(src, 0.0))])
    return rows


def _matrix_html(d: Dashboard) -> str:
    rows = _matrix_rows(d)
    if not rows:
        return ""
    return _table("nbp-comm", _MATRIX_CAPTION, rows[0], rows[1:], [r[0] for r in rows[1:]])


def _table(cls: str, caption: str, head: list[str], rows: list[list[str]], keys: list[Any]) -> str:
    th = "".join(f'<th style="{_CELL}">{_html.escape(h)}</th>' for h in head)
    body = "".join(f'<tr data-engine="{k}">' + "".join(f'<td style="{_CELL}">{c}</td>' for c in r) + "</tr>"
                   for k, r in zip(keys, rows))
    return (f'<table class="{cls}" style="{_FONT} border-collapse: collapse; margin: 4px 0;">'
            f'<caption style="text-align: left; font-weight: bold;">{_html.escape(caption)}</caption>'
            f"<tr>{th}</tr>{body}</table>")


def _columns(rows: list[list[str]], left: tuple[int, ...] = ()) -> list[str]:
    """Rows of cells as aligned text lines: numbers right-aligned, columns in ``left`` left-aligned."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


# ----------------------------------------------------------------------------------------------------
# Pipeline


def _pipeline_caption(view: PipelineView, info: _Info | None, truncated: bool = False) -> str:
    if info is None:  # not announced (yet): what was measured so far
        return (f"pipeline run {view.run}: bubble {view.bubble:.1%} measured; "
                f"{seconds(view.makespan)} on {view.p} engines"
                + ("; too many ops to hold, only the newest shown" if truncated else ""))
    theory = f"{info.theory:.1%}" if info.theory is not None else "n/a"
    stash = ", ".join(f"s{s} {n}" for s, n in sorted(info.peak_stash.items())) or "n/a"
    return (f"pipeline run {view.run} ({info.schedule}): bubble {view.bubble:.1%} measured, "
            f"{theory} theory for its measured op times; {seconds(view.makespan)} on {view.p} "
            f"engines; peak stash {stash}"
            + ("; too many ops to hold, only the newest shown" if truncated else ""))


def _names(view: PipelineView, info: _Info | None) -> dict[int, str]:
    """Each timeline row's label: ``engine E``, or with a layout of replicas or tensor ranks
    also its place in it (``engine 2 d1 t0``: data-parallel replica 1, tensor rank 0)."""
    places = dict(info.labels) if info is not None else {}
    return {e: f"engine {e}" + (f" {places[e]}" if e in places else "") for e in view.engines}


def _timeline_svg(view: PipelineView, names: dict[int, str] | None = None) -> str:
    """One row per engine: op spans coloured by kind, idle gaps shaded as bubbles, a time axis."""
    names = names or {e: f"engine {e}" for e in view.engines}
    longest = max(len(n) for n in names.values())
    label = _LABEL if longest <= 9 else 7 * longest + 10  # ~7 px a character
    width = SVG_WIDTH - label - 8
    scale = width / view.makespan if view.makespan > 0 else 0.0

    def x(t: float) -> float:
        return label + (t - view.start) * scale

    rows, titles = [], sum(len(v) for v in view.spans.values()) <= _MAX_TITLES
    for i, e in enumerate(view.engines):
        y = i * (_ROW + _PAD)
        parts = [f'<text x="{label - 6}" y="{_ROW - 4}" text-anchor="end" fill="currentColor">'
                 f"{_html.escape(names[e])}</text>"]
        for a, b in view.gaps[e]:
            if x(b) - x(a) >= 0.5:  # sub-pixel gaps would only bloat the SVG
                parts.append(f'<rect class="nbp-bubble" x="{x(a):.1f}" width="{x(b) - x(a):.1f}" '
                             f'height="{_ROW}" fill="{BUBBLE}" fill-opacity="0.25"/>')
        for x0, x1, kind, members in _coalesce(view.spans[e], x):
            tip = ""
            if titles and len(members) == 1:
                tip = f"<title>{_html.escape(span_name(members[0]))}</title>"
            edge = ' stroke="#fff" stroke-width="0.5"' if len(members) == 1 else ""  # op boundaries
            parts.append(f'<rect class="nbp-op" data-kind="{kind}" x="{x0:.1f}" '
                         f'width="{max(x1 - x0, 0.5):.1f}" height="{_ROW}" '
                         f'fill="{COLORS.get(kind, "#999")}"{edge}>{tip}</rect>')
        rows.append(f'<g class="nbp-row" data-engine="{e}" transform="translate(0,{y})">{"".join(parts)}</g>')
    y = len(view.engines) * (_ROW + _PAD)
    axis = (f'<text x="{label}" y="{y + 10}" fill="currentColor">0</text>'
            f'<text x="{label + width}" y="{y + 10}" text-anchor="end" fill="currentColor">'
            f"{seconds(view.makespan)}</text>")
    legend, lx = [], label + 60
    present = {s.kind for row in view.spans.values() for s in row}
    for kind in [k for k in ("F", "B", "I", "W", "step") if k in present]:
        legend.append(f'<rect x="{lx}" y="{y + 2}" width="9" height="9" fill="{COLORS[kind]}"/>'
                      f'<text x="{lx + 12}" y="{y + 10}" fill="currentColor">{kind}</text>')
        lx += 24 + 7 * len(kind)
    legend.append(f'<rect x="{lx}" y="{y + 2}" width="9" height="9" fill="{BUBBLE}" fill-opacity="0.25"/>'
                  f'<text x="{lx + 12}" y="{y + 10}" fill="currentColor">bubble</text>')
    height = y + 14
    return (f'<svg class="nbp-timeline" xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" '
            f'height="{height}" viewBox="0 0 {SVG_WIDTH} {height}" style="font: 11px sans-serif;">'
            f'{"".join(rows)}{axis}{"".join(legend)}</svg>')


def _coalesce(spans: Iterable[Span],
              x: Callable[[float], float]) -> list[tuple[float, float, str, list[Span]]]:
    """Rectangles to draw for one row. Spans under :data:`_JOIN_PX` wide that follow each other
    within half a pixel are drawn as one rectangle until it is that wide, coloured by the kind that
    fills most of it: a row of thousands of ops stays a few hundred rectangles."""
    groups: list[tuple[float, float, list[Span]]] = []
    for s in spans:
        x0, x1 = x(s.start), x(s.end)
        if (groups and x1 - x0 < _JOIN_PX and x0 - groups[-1][1] < 0.5
                and groups[-1][1] - groups[-1][0] < _JOIN_PX):
            a, b, members = groups[-1]
            members.append(s)
            groups[-1] = (a, max(b, x1), members)
        else:
            groups.append((x0, x1, [s]))
    return [(a, b, _dominant(members), members) for a, b, members in groups]


def _dominant(spans: Iterable[Span]) -> str:
    time_by_kind: dict[str, float] = {}
    for s in spans:
        time_by_kind[s.kind] = time_by_kind.get(s.kind, 0.0) + s.end - s.start
    return max(time_by_kind, key=time_by_kind.__getitem__)


def _timeline_text(view: PipelineView, cols: int = 64,
                   names: dict[int, str] | None = None) -> list[str]:
    """One line per engine; a column shows the kind that fills most of it, '+' when no kind fills
    half its busy time (ops far shorter than a column), '.' when it is mostly idle."""
    step = view.makespan / cols if view.makespan > 0 else 1.0
    names = names or {e: f"engine {e}" for e in view.engines}
    width = max(len(n) for n in names.values())
    out = []
    for e in view.engines:
        filled: list[dict[str, float]] = [{} for _ in range(cols)]
        for s in view.spans[e]:
            a, b = (s.start - view.start) / step, (s.end - view.start) / step
            for c in range(max(0, math.floor(a)), min(cols, math.ceil(b))):
                share = min(b, c + 1) - max(a, c)
                filled[c][s.kind] = filled[c].get(s.kind, 0.0) + share
        row = ""
        for col in filled:
            busy = sum(col.values())
            kind = max(col, key=col.__getitem__) if busy >= 0.5 else "."
            row += "." if kind == "." else "+" if col[kind] < busy / 2 else "s" if kind == "step" else kind
        out.append(f"  {names[e]:>{width}} |{row}|")
    return out + [f"  ('.' idle, '+' mixed, {seconds(step)} per column)"]
