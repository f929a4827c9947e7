"""The charts over time: one-second bins of busy share, CPU and bytes per second (pure), their
SVG and text, and the same fed by real engines."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import nbparallel
from nbparallel.telemetry.history import History
from nbparallel.telemetry.records import Sample, Span, Transfer
from nbparallel.telemetry.reduce import Telemetry
from nbparallel.widgets.charts import area_path, history_svg, history_text, line_path, sparkline
from nbparallel.widgets.dashboard import Dashboard


def test_busy_seconds_fall_in_the_bins_they_cover_and_nested_collectives_are_not_counted_twice():
    h = History(step=1.0, span=4.0)
    h.add_span(0, "scatter", 10.5, 12.25)
    h.add_span(0, "comm", 10.6, 10.9)  # inside the cell above
    h.add_span(1, "F", 11.0, 11.5)
    h.add_span(1, "B", 11.25, 11.75)  # overlapping work is capped at the whole bin
    assert h.busy(0, now=13.0) == [0.0, 0.5, 1.0, 0.25]
    assert h.busy(1, now=13.0) == [0.0, 0.0, 1.0, 0.0]
    assert h.busy(7, now=13.0) == [0.0] * 4  # an engine never seen


def test_cpu_is_the_mean_of_each_bins_samples_and_none_without_one():
    h = History(step=1.0, span=3.0)
    h.add_sample(0, 5.1, cpu=40.0)
    h.add_sample(0, 5.9, cpu=60.0, gpu=30.0)
    h.add_sample(0, 7.5, cpu=100.0)
    assert h.cpu(0, now=8.0) == [50.0, None, 100.0]
    assert h.gpu(0, now=8.0) == [30.0, None, None]
    assert h.has_gpu()


def test_rates_are_bytes_per_second_by_flow_comm_apart_from_stages():
    tel = Telemetry([0, 1])
    tel.history = History(step=0.5, span=2.0)
    tel.ingest(transfers=[Transfer(0, "scatter", "out", "shm", 1000, 100.1),
                          Transfer(0, "gather", "in", "shm", 500, 100.2),
                          Transfer(1, "stage", "out", "direct", 300, 100.6),
                          Transfer(1, "comm", "out", "shm", 200, 100.7)])
    rates = tel.history.rates(now=101.0)
    assert rates["out"] == [0.0, 0.0, 2000.0, 0.0]
    assert rates["in"] == [0.0, 0.0, 1000.0, 0.0]
    assert rates["stage"] == [0.0, 0.0, 0.0, 600.0]
    assert rates["comm"] == [0.0, 0.0, 0.0, 400.0]


def test_a_chart_goes_back_to_the_first_record_between_30_s_and_the_window():
    h = History(step=1.0, span=300.0)
    assert h.shown(now=50.0) == 30
    h.add_bytes("out", 10.0, 1)
    assert h.shown(now=20.0) == 30 and h.shown(now=100.0) == 91 and h.shown(now=900.0) == 300
    assert len(h.busy(0, now=100.0, bins=h.shown(100.0))) == 91


def test_ten_minutes_of_records_keep_only_the_window():
    h = History(step=1.0, span=300.0)
    for i in range(600 * 20):  # 20 spans, samples and transfers a second for 10 minutes
        t = i / 20
        h.add_span(i % 4, "chunk", t, t + 0.04)
        h.add_sample(i % 4, t, cpu=50.0)
        h.add_bytes("out", t, 100)
    held = [len(b) for store in (h._busy, h._cpu) for b in store.values()]
    held += [len(b) for b in h._bytes.values()]
    assert max(held) <= 300 + 300 // 4 + 2  # the window, and what came since the last prune
    assert h.busy(0, now=600.0)[-1] == pytest.approx(0.2)


def test_the_paths_and_text_follow_the_values():
    assert area_path([], 10, 4) == "" and line_path([], 10, 4) == ""
    assert line_path([None, 0.5, None, 1.0], 40, 10) == "M15.0,5.0 M35.0,0.0"
    assert sparkline([0.0, 0.5, 1.0, None]) == " ▄█ "
    assert sparkline([1.0] * 8 + [0.0] * 8, width=4) == "██  "
    assert sparkline([50.0, 100.0], top=100.0) == "▄█"
    rows = [("engine 0", [0.0, 1.0], [None, 80.0], [None, None]),
            ("engine 1", [0.5, 0.5], [20.0, 20.0], [10.0, 90.0])]
    rates = {"out": [0.0, 2e9], "in": [0.0, 0.0], "stage": [1e6, 0.0], "comm": [0.0, 0.0]}
    svg = history_svg(rows, rates, 1.0)
    root = ET.fromstring(svg)  # well-formed
    ns = "{http://www.w3.org/2000/svg}"
    busy = [p.get("d") for p in root.iter(f"{ns}path") if p.get("class") == "nbp-busy"]
    assert len(busy) == 2 and busy[0] != busy[1]
    assert [p.get("data-flow") for p in root.iter(f"{ns}path") if p.get("class") == "nbp-rate"] \
        == ["out", "stage"]
    assert sum(1 for p in root.iter(f"{ns}path") if p.get("class") == "nbp-gpu") == 1
    text = history_text(rows, rates, cols=2)
    assert text[0] == "  engine 0 busy | █|  CPU | ▆|"  # 80% of the top, 100%
    assert any(line.strip().startswith("bytes/s  out |") for line in text)


def test_the_dashboard_draws_the_charts_and_says_them_in_text():
    d = Dashboard([0, 1], live=False, clock=lambda: 1003.0)
    assert d._sections(1003.0)["history"] == ""  # nothing happened yet: no empty charts
    d.feed(spans=[Span(0, "scatter", 1000.0, 1002.0)], samples=[Sample(1, 1001.5, 75.0)],
           transfers=[Transfer(0, "scatter", "out", "shm", 4_000_000, 1001.2)])
    html = d.html()
    assert 'class="nbp-history"' in html and "busy share (area)" in html
    assert "over the last 30 s" in d.text()  # back to the first record, at least 30 s
    d._clock = lambda: 1400.0
    d.feed(spans=[Span(0, "scatter", 1398.0, 1399.0)])
    assert "over the last 5 minutes" in d.text()  # at most the whole window
    assert "engine 0 busy |" in d.text()


@pytest.mark.cluster
def test_real_engines_busy_shows_in_their_bins(pool):
    nbparallel.pmap("import time\ntime.sleep(0.05)\nx", "x", range(40), pool=pool,
                    show_progress=False, engines=[0, 1])
    nbparallel.scatter("y = x * 2", {"x": np.zeros(2_000_000)}, gather=["y"], pool=pool,
                       engines=[0, 1])
    time.sleep(1.05 - time.time() % 1.0)  # the bins of the work are complete
    tel = Telemetry([0, 1])
    tel.ingest(transfers=pool.transfers.since(0)[0], spans=pool.monitor.spans.since(0)[0])
    now = time.time()
    for e in (0, 1):
        assert sum(tel.history.busy(e, now)) >= 0.5  # 40 x 50 ms over two engines, ~1 s each
    assert max(tel.history.rates(now)["out"]) >= 16e6 / 2  # the 16 MB scatter, in one bin or two
