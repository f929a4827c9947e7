"""The dashboard without a kernel: static HTML, text, redraw coalescing, the pipeline SVG; and its
live widgets with the kernel check and display faked (a real kernel is the notebook tests' job)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from nbparallel.pipeline import schedule as sched
from nbparallel.telemetry.records import Sample, Span, Transfer
from nbparallel.widgets import dashboard as dash_mod
from nbparallel.widgets.dashboard import MIN_INTERVAL, Dashboard


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Tags(HTMLParser):
    """Every start tag with its attributes, to check the HTML parses and carries the contract."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, cls: str) -> list[dict[str, str]]:
        return [a for _, a in self.tags if cls in a.get("class", "").split()]


def summary(html: str) -> dict[str, str]:
    found = Tags(html).find("nbp-summary")
    assert len(found) == 1
    return found[0]


def pipeline_spans(name: str, p: int, m: int, engines: list[int], run: str, t0: float) -> list[Span]:
    sim = sched.simulate(sched.build(name, p, m))
    return [Span(engines[sp.rank], sp.op.kind, t0 + sp.start * 0.01, t0 + sp.end * 0.01, run,
                 sp.op.stage, sp.op.mb) for sp in sim.spans]


TRANSFERS = [
    Transfer(0, "scatter", "out", "shm", 4_000_000, 999.5),
    Transfer(1, "scatter", "out", "shm", 4_000_000, 999.5),
    Transfer(0, "gather", "in", "shm", 1_000, 999.8),
    Transfer(1, "stage", "out", "direct", 123, 999.9),
]


def test_html_carries_the_summary_contract():
    clock = Clock()
    d = Dashboard([0, 1, 2], clock=clock)
    assert d._root is None  # no kernel here: no widgets
    s = summary(d.html())
    assert (s["data-engines"], s["data-bytes"]) == ("3", "0")
    d.feed(transfers=TRANSFERS[:2])
    d.feed(transfers=TRANSFERS[2:])
    page = d.html()
    assert Tags(page).find("nbp-dashboard")
    s = summary(page)
    assert (s["data-engines"], s["data-bytes"]) == ("3", str(8_001_123))
    # A record from an engine not listed at the start counts it in.
    d.feed(samples=[Sample(7, 1000.0, 12.0)])
    assert summary(d.html())["data-engines"] == "4"


def test_text_rendering():
    clock = Clock()
    d = Dashboard([0, 1], title="%%pmap", clock=clock)
    d.feed(transfers=TRANSFERS,
           spans=[Span(0, "pmap", 996.0, 1000.0, "p", items=4), Span(0, "pmap", 997.0, 999.0, "p")],
           samples=[Sample(0, 999.0, 97.0, 3, 55.0, 2_000_000_000, 8_000_000_000)])
    text = d.text()
    lines = text.splitlines()
    assert lines[0] == "%%pmap: 2 engines, 7.6 MiB moved, 7.6 MiB/s now"
    row0 = next(line.split() for line in lines if line.split()[:1] == ["0"])
    assert row0[:6] == ["0", "80%", "3", "97%", "55%", "1.9"]  # 4 s of 5 busy; overlap counted once
    assert "scatter →3.8 MiB" in text and "gather ←1000 B" in text and "stage 123 B" in text
    assert "pipeline" not in text


def test_tick_coalesces_redraws():
    clock = Clock(1000.0)
    d = Dashboard([0, 1], clock=clock)
    assert d.tick()  # the first look draws
    first = summary(d._page(d._shown))["data-redraws"]
    d.feed(transfers=TRANSFERS[:1])
    clock.t += 0.1
    assert not d.tick()  # too soon
    clock.t += MIN_INTERVAL
    assert d.tick()  # changed, and late enough
    assert summary(d._page(d._shown))["data-redraws"] != first  # every redraw changes the DOM
    clock.t += 1.0
    assert not d.tick()  # nothing new, nothing decays
    clock.t += 0.1
    d.feed(samples=[Sample(0, clock.t, 50.0)])
    assert not d.tick()  # changed, but within MIN_INTERVAL of the last look
    clock.t += MIN_INTERVAL
    assert d.tick()
    # Redraws per second stay at or under 1 / MIN_INTERVAL however often tick and feed are called.
    drawn = 0
    for _ in range(1000):
        clock.t += 0.002
        d.feed(transfers=[Transfer(0, "payload", "out", "shm", 10, clock.t)])
        drawn += d.tick()
    assert drawn <= 2 / MIN_INTERVAL + 1


def test_tick_redraws_while_busy_fractions_decay():
    clock = Clock(1000.0)
    d = Dashboard([0], clock=clock)
    d.feed(spans=[Span(0, "pmap", 995.0, 1000.0)])
    assert d.tick() and "100%" in d._shown["load"]
    clock.t += 1.0
    assert d.tick() and "80%" in d._shown["load"]  # no new records, but the window slid
    clock.t += 10.0
    assert d.tick() and "</svg> 0%" in d._shown["load"]
    clock.t += 1.0
    assert not d.tick()  # settled at 0 %


def test_tick_survives_a_clock_going_back():
    clock = Clock(1000.0)
    d = Dashboard([0], clock=clock)
    assert d.tick()
    clock.t -= 60.0
    d.feed(transfers=TRANSFERS[:1])
    assert d.tick()


def test_pipeline_svg_has_one_row_per_engine():
    clock = Clock(1000.0)
    d = Dashboard([4, 5, 6, 7], clock=clock)
    engines = [6, 4, 7, 5]  # rank r on engines[r]
    d.feed(spans=pipeline_spans("1f1b", 4, 8, engines, "abc", 999.0))
    theory = sched.theoretical_bubble("1f1b", 4, 8)
    d.pipeline("abc", "1f1b", theory, {0: 4, 1: 3, 2: 2, 3: 1})
    page = d.html()
    tags = Tags(page)
    rows = tags.find("nbp-row")
    assert [r["data-engine"] for r in rows] == ["6", "4", "7", "5"]  # rank order
    assert len(tags.find("nbp-timeline")) == 1
    assert tags.find("nbp-bubble")
    kinds = {a["data-kind"] for a in tags.find("nbp-op")}
    assert kinds == {"F", "B"}
    bubble = d.telemetry.run("abc").bubble
    assert bubble == pytest.approx(theory)
    assert f"bubble {bubble:.1%} measured, {theory:.1%} theory" in page
    assert "peak stash s0 4, s1 3, s2 2, s3 1" in page
    text = d.text()
    assert len(re.findall(r"^\s+engine \d \|[FB.]+\|$", text, re.M)) == 4


def test_pipeline_shows_the_newest_run_as_its_spans_arrive():
    clock = Clock(1000.0)
    d = Dashboard([0, 1, 2, 3], clock=clock)
    d.pipeline("old", "gpipe", 0.5, {0: 8})  # announced, but its spans never come to this board
    assert "nbp-pipeline" not in d.html()
    spans = pipeline_spans("zb-h1", 4, 8, [0, 1, 2, 3], "new", 990.0)
    d.feed(spans=spans[: len(spans) // 2])  # half-way through the run, not announced yet
    assert d.tick()
    caption = re.search(r'class="nbp-pipeline"[^>]*><div>([^<]*)', d._shown["pipeline"]).group(1)
    assert caption.startswith("pipeline run new: bubble ") and "theory" not in caption
    assert len(Tags(d._shown["pipeline"]).find("nbp-row")) == 4
    d.feed(spans=spans[len(spans) // 2:])
    d.pipeline("new", "zb-h1", None, {})
    clock.t += 1.0
    assert d.tick()
    assert "pipeline run new (zb-h1): bubble" in d._shown["pipeline"]
    assert "n/a theory" in d._shown["pipeline"]
    assert "pipeline run new (zb-h1)" in d.text()


def test_a_big_pipeline_run_stays_a_small_svg():
    clock = Clock(1000.0)
    d = Dashboard([0, 1, 2, 3], clock=clock)
    d.feed(spans=pipeline_spans("zb-h1", 4, 512, [0, 1, 2, 3], "big", 990.0))
    d.pipeline("big", "zb-h1", 0.01, {})
    assert d.tick()
    # 6,000 ops become at most a few hundred rectangles per row.
    assert d._shown["pipeline"].count("<rect") < 4 * 1500
    assert len(d._shown["pipeline"]) < 400_000


def test_show_and_finish_without_a_kernel_print_text(capsys):
    d = Dashboard([0], clock=Clock())
    d.finish()
    assert capsys.readouterr().out == ""  # never shown: nothing to leave behind
    d = Dashboard([0], clock=Clock())
    d.show()
    d.feed(transfers=TRANSFERS[:1])
    d.finish()
    out = capsys.readouterr().out
    assert out.count("nbparallel: 1 engine,") == 2 and "3.8 MiB moved" in out
    assert not d.tick()  # finished


# -- live widgets, with the kernel check and display faked -----------------------------------------


class Handle:
    def __init__(self, obj):
        self.shown = [obj]

    def update(self, obj, **kwargs):
        self.shown.append((obj, kwargs))


@pytest.fixture
def kernel(monkeypatch):
    handles: list[Handle] = []

    def display(obj, **kwargs):
        handles.append(Handle(obj))
        return handles[-1]

    monkeypatch.setattr(dash_mod, "_in_kernel", lambda: True)
    monkeypatch.setattr(dash_mod, "_display", display)
    return handles


def test_live_widgets_send_only_what_changed(kernel):
    clock = Clock(1000.0)
    d = Dashboard([0, 1], clock=clock)
    assert d._root is not None and "nbp-dashboard" in d._root._dom_classes
    d.show()
    assert kernel[0].shown == [d._root]
    changes = {name: 0 for name in d._widgets}
    for name, w in d._widgets.items():
        w.observe(lambda change, name=name: changes.__setitem__(name, changes[name] + 1), "value")
    clock.t += 1.0
    d.feed(transfers=TRANSFERS[:1])
    assert d.tick()
    assert changes == {"head": 1, "load": 0, "history": 1, "volume": 1, "comm": 0, "pipeline": 0}
    head = d._widgets["head"].value
    assert summary(head)["data-bytes"] == "4000000"
    clock.t += 1.0
    d.feed(samples=[Sample(1, clock.t, 30.0)])
    assert d.tick()
    # The charts over time moved on a second (their window slides with the clock).
    assert changes == {"head": 2, "load": 1, "history": 2, "volume": 1, "comm": 0, "pipeline": 0}

    d.finish()
    bundle, kwargs = kernel[0].shown[-1]
    assert kwargs == {"raw": True}
    assert summary(bundle["text/html"]) == summary(d._page(d._shown))
    assert 'class="nbp-dashboard' in bundle["text/html"]
    assert bundle["text/plain"].startswith("nbparallel: 2 engines")
    assert d._root is None and d._widgets == {}


def test_not_live_in_a_kernel_shows_static_html(kernel):
    d = Dashboard([0], live=False, clock=Clock())
    assert d._root is None
    d.show()
    assert "nbp-summary" in kernel[0].shown[0]["text/html"]
    d.finish()
    assert "nbp-summary" in kernel[0].shown[-1][0]["text/html"]
    assert len(kernel) == 1


def test_finish_in_a_kernel_without_show_still_leaves_html(kernel):
    d = Dashboard([0], clock=Clock())
    d.finish()
    assert len(kernel) == 1 and "nbp-summary" in kernel[0].shown[0]["text/html"]


def test_the_comm_matrix_shows_bytes_between_engines_and_time_in_collectives():
    clock = Clock(100.0)
    d = Dashboard([0, 1, 2], live=False, clock=clock)
    assert "nbp-comm" not in d.html() and "engine to engine (comm" not in d.text()
    d.feed(transfers=[Transfer(0, "comm", "out", "shm", 3 << 20, 99.0, peer=1),
                      Transfer(1, "comm", "out", "shm", 1 << 20, 99.0, peer=0),
                      Transfer(1, "stage", "out", "direct", 1 << 20, 99.1, peer=2),
                      Transfer(2, "scatter", "out", "shm", 5 << 20, 99.2)],
           spans=[Span(0, "comm", 98.0, 98.5), Span(0, "comm", 98.6, 98.7), Span(1, "scatter", 97.0, 99.0)])
    text = d.text()
    assert "  0                -  3.0 MiB      0 B          600 ms" in text
    assert "  1          1.0 MiB        -  1.0 MiB             0 s" in text
    assert len(Tags(d.html()).find("nbp-comm")) == 1
    # Engine-to-engine bytes are neither "to engine" nor "from engine" in the volume table.
    volume = text.split("bytes moved\n", 1)[1]
    row0 = next(line for line in volume.splitlines() if line.startswith("       0 "))
    assert row0.split()[1:6] == ["0", "B", "0", "B", "3.0"]
