"""Where the data lives: the pure renderers of nbparallel.widgets.placement, and the Placement a
real ``--keep`` handle returns."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from nbparallel.widgets import placement as placement_module
from nbparallel.widgets.placement import Placement, StageMap, stage_map

SVG = "{http://www.w3.org/2000/svg}"


def three(lost_engine=None):
    rows = [{"engine": 0, "rank": 0, "rows": (0, 4), "bytes": 32, "device": "cpu"},
            {"engine": 1, "rank": 1, "rows": (4, 7), "bytes": 24, "device": "cuda:0 NVIDIA H200"},
            {"engine": 2, "rank": 2, "rows": (7, 10), "bytes": 24, "device": "cpu"}]
    for r in rows:
        r["lost"] = r["engine"] == lost_engine
    return Placement(rows, title="y: (10,) float64, axis 0")


def svg_of(html):
    """The whole HTML is well-formed XML; its one <svg> element."""
    root = ET.fromstring(html)
    svgs = list(root.iter(f"{SVG}svg"))
    assert len(svgs) == 1
    return root, svgs[0]


def shards(svg):
    return [g for g in svg.iter(f"{SVG}g") if "nbp-shard" in g.get("class", "").split()]


def texts(el):
    return ["".join(t.itertext()) for t in el.iter(f"{SVG}text")]


def test_a_placement_is_still_the_list_of_rows():
    p = three()
    assert isinstance(p, list) and len(p) == 3
    assert [r["rows"] for r in p] == [(0, 4), (4, 7), (7, 10)]
    assert p[-1]["rows"][1] == p.total_rows == 10
    assert p == [dict(r) for r in p]
    assert Placement([{"engine": 0, "rank": 0, "rows": None, "bytes": 0}]).total_rows is None


def test_the_svg_has_a_block_per_shard_with_its_engine_and_rows():
    root, svg = svg_of(three()._repr_html_())
    assert root.get("class") == "nbp-placement"
    blocks = shards(svg)
    assert [g.get("data-engine") for g in blocks] == ["0", "1", "2"]
    assert [(g.get("data-lo"), g.get("data-hi")) for g in blocks] == [("0", "4"), ("4", "7"), ("7", "10")]
    for g, rows, device in zip(blocks, ["rows 0-3", "rows 4-6", "rows 7-9"], ["cpu", "cuda:0", "cpu"]):
        label = texts(g)
        assert label[0] == f"engine {g.get('data-engine')}"
        assert label[1] == rows
        assert device in label[2] and "B" in label[2]
        assert g.get("data-lost") == "false"
    # Widths in proportion to the rows: 4, 3, 3 of 10.
    widths = [float(g.find(f"{SVG}rect").get("width")) for g in blocks]
    assert widths[0] / sum(widths) == pytest.approx(0.4)
    assert widths[1] == pytest.approx(widths[2])
    # Row numbers where the shards meet, under the bar.
    assert {"0", "4", "7", "10"} <= set(texts(svg))
    caption = root.find("div").text
    assert caption == "y: (10,) float64, axis 0: 10 rows in 3 shards on engines 0-2, 80 B"


def test_the_table_under_the_bar_lists_every_shard():
    root, _ = svg_of(three()._repr_html_())
    table = root.find("table")
    rows = table.findall("tr")[1:]
    assert [r.get("data-engine") for r in rows] == ["0", "1", "2"]
    cells = ["".join(td.itertext()).strip() for td in rows[1].findall("td")]
    assert cells[:5] == ["1", "1", "rows 4-6", "24 B", "cuda:0 NVIDIA H200"]


def test_a_lost_shard_is_hatched_and_says_lost():
    root, svg = svg_of(three(lost_engine=1)._repr_html_())
    lost = [g for g in shards(svg) if g.get("data-lost") == "true"]
    assert [g.get("data-engine") for g in lost] == ["1"]
    g = lost[0]
    assert "nbp-lost" in g.get("class").split()
    assert "lost" in texts(g)
    fills = [r.get("fill") for r in g.iter(f"{SVG}rect")]
    assert fills[0] == placement_module.LOST and fills[1].startswith("url(#nbp-hatch-")
    pattern = fills[1][len("url(#"):-1]
    assert [p.get("id") for p in svg.iter(f"{SVG}pattern")] == [pattern]
    assert "1 lost with engine(s) 1" in root.find("div").text
    assert "lost" in ["".join(td.itertext()) for td in root.find("table").findall("tr")[2]]


def test_the_text_has_a_line_per_shard_and_a_proportional_bar():
    lines = str(three(lost_engine=2)).splitlines()
    assert lines[0] == ("y: (10,) float64, axis 0: 10 rows in 3 shards on engines 0-2, 80 B; "
                        "1 lost with engine(s) 2")
    assert lines[1] == "  [0000111///]"
    assert lines[2].split() == ["engine", "0", "rows", "0-3", "32", "B", "cpu"]
    assert lines[3].startswith("  engine 1  rows 4-6  24 B  cuda:0 NVIDIA H200")
    assert lines[4].split()[-1] == "lost"
    assert len(lines) == 5


def test_the_text_bar_keeps_its_proportions_for_many_rows_and_engines():
    p = Placement([{"engine": 10 + i, "rank": i, "rows": (i * 1000, (i + 1) * 1000 + (i == 3) * 3000),
                    "bytes": 8000} for i in range(4)])
    lines = p.text().splitlines()
    bar = lines[1].strip()[1:-1]
    assert len(bar) == placement_module.BAR_COLS
    assert [bar.count(c) for c in "abcd"] == [9, 9, 9, 37]  # 1000, 1000, 1000, 4000 of 7000 rows
    assert lines[2].split()[:3] == ["a:", "engine", "10"]  # ids of two digits: a key per shard


def test_a_tiny_shard_still_shows_in_the_bar():
    p = Placement([{"engine": 0, "rank": 0, "rows": (0, 1), "bytes": 8},
                   {"engine": 1, "rank": 1, "rows": (1, 1000), "bytes": 7992}])
    bar = p.text().splitlines()[1].strip()[1:-1]
    assert bar.count("0") == 1 and bar.count("1") >= 63


def test_shards_without_counted_rows_are_drawn_by_bytes():
    p = Placement([{"engine": 0, "rank": 0, "rows": None, "bytes": 300},
                   {"engine": 1, "rank": 1, "rows": None, "bytes": 100}], title="d")
    assert p.total_rows is None
    assert "rows not counted" in p.caption()
    _, svg = svg_of(p.html())
    widths = [float(g.find(f"{SVG}rect").get("width")) for g in shards(svg)]
    assert widths[0] == pytest.approx(3 * widths[1])
    assert "rows ?" in str(p)


def test_an_empty_placement_renders():
    p = Placement([], title="nothing")
    svg_of(p.html())
    assert str(p) == "nothing: rows not counted (widths by bytes) in 0 shards on no engines, 0 B"


def test_ipython_pretty_prints_the_text():
    from IPython.lib.pretty import pretty

    p = three()
    assert pretty(p) == str(p)
    assert pretty(stage_map([{"stage": "s0", "engine": 0}])) == str(stage_map([{"stage": "s0", "engine": 0}]))


def test_titles_and_devices_are_escaped():
    p = Placement([{"engine": 0, "rank": 0, "rows": (0, 1), "bytes": 1, "device": "<gpu & co>"}],
                  title="a<b>")
    root, svg = svg_of(p.html())
    assert root.find("div").text.startswith("a<b>: ")


STAGES = [
    {"stage": "s0", "engine": 0, "replica": 0, "tp_rank": 0, "bytes": 1024, "device": "cuda:0"},
    {"stage": "s0", "engine": 1, "replica": 0, "tp_rank": 1, "bytes": 1024, "device": "cuda:1"},
    {"stage": "s0", "engine": 4, "replica": 1, "tp_rank": 0, "bytes": 1024, "device": "cuda:4"},
    {"stage": "s0", "engine": 5, "replica": 1, "tp_rank": 1, "bytes": 1024, "device": "cuda:5"},
    {"stage": "s1", "engine": 3, "replica": 0, "tp_rank": 1, "bytes": 512, "device": "cuda:3"},
    {"stage": "s1", "engine": 2, "replica": 0, "tp_rank": 0, "bytes": 512, "device": "cuda:2"},
    {"stage": "s1", "engine": 6, "replica": 1, "tp_rank": 0, "bytes": 512, "lost": True},
    {"stage": "s1", "engine": 7, "replica": 1, "tp_rank": 1, "bytes": 512, "device": "cuda:7"},
]


def test_the_stage_map_is_a_grid_of_stages_by_replicas():
    m = stage_map(STAGES)
    assert isinstance(m, StageMap) and list(m) == STAGES
    assert m.stages == ["s0", "s1"] and m.replicas == [0, 1]
    assert [r["engine"] for r in m.cell("s1", 0)] == [2, 3]  # by tensor rank
    root, svg = svg_of(m._repr_html_())
    assert root.get("class") == "nbp-stage-map"
    assert {"replica 0", "replica 1"} <= set(texts(svg))
    stages = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "nbp-stage"]
    assert [g.get("data-stage") for g in stages] == ["s0", "s1"]
    for g, engines in zip(stages, [["0", "1", "4", "5"], ["2", "3", "6", "7"]]):
        blocks = shards(g)
        assert [b.get("data-engine") for b in blocks] == engines
        assert [b.get("data-tp") for b in blocks] == ["0", "1", "0", "1"]
        for b in blocks:
            label = texts(b)
            assert label[0] == f"engine {b.get('data-engine')}"
            assert label[1].startswith(f"t{b.get('data-tp')} · ")
    lost = [b for b in shards(svg) if b.get("data-lost") == "true"]
    assert [b.get("data-engine") for b in lost] == ["6"] and "lost" in texts(lost[0])
    assert len(root.find("table").findall("tr")) == 1 + len(STAGES)
    assert "2 stages x 2 replicas on engines 0-7" in root.find("div").text


def test_the_stage_map_text():
    lines = str(stage_map(STAGES, title="model")).splitlines()
    assert lines[0] == ("model: 2 stages x 2 replicas on engines 0-7, 6.0 KiB, up to 2 tensor ranks a "
                        "stage; lost with engine(s) 6")
    assert lines[1].split() == ["stage", "replica", "0", "replica", "1"]
    assert lines[2].split()[0] == "s0"
    assert "engine 0 t0 1.0 KiB cuda:0; engine 1 t1 1.0 KiB cuda:1" in lines[2]
    assert "engine 6 t0 512 B lost; engine 7 t1 512 B cuda:7" in lines[3]
    # The columns line up: each replica's cells start where its heading does.
    at = lines[1].index("replica 1")
    assert lines[2][at:].startswith("engine 4") and lines[3][at:].startswith("engine 6")


def test_a_stage_map_without_replicas_or_tensor_ranks():
    m = stage_map([{"stage": "a", "engine": 0, "bytes": 8}, {"stage": "b", "engine": 1, "bytes": 8}])
    assert m.replicas == [0]
    _, svg = svg_of(m.html())
    assert [b.get("data-tp") for b in shards(svg)] == ["", ""]
    assert str(m).splitlines()[2].split() == ["a", "engine", "0", "8", "B"]
    svg_of(stage_map([]).html())


@pytest.mark.cluster
def test_a_kept_value_draws_where_its_rows_live(pool):
    import nbparallel

    y = nbparallel.scatter("y = x * 2", {"x": np.arange(10.0)}, keep=["y"], pool=pool)["y"]
    p = y.placement()
    assert isinstance(p, Placement) and len(p) == 3
    engines = [r["engine"] for r in p]
    assert [r["rows"] for r in p] == [(0, 4), (4, 7), (7, 10)]
    assert [r["bytes"] for r in p] == [32, 24, 24]
    assert not any(r["lost"] for r in p) and y.lost == []
    assert all(r.get("device") for r in p)
    assert p.title.startswith("y: (10,) float64") and p.total_rows == 10
    html = p._repr_html_()
    _, svg = svg_of(html)
    assert [int(g.get("data-engine")) for g in shards(svg)] == engines
    for e in engines:
        assert f"engine {e}" in html
    lines = str(p).splitlines()
    assert len(lines) == 2 + 3
    for line, e, rows in zip(lines[2:], engines, ["rows 0-3", "rows 4-6", "rows 7-9"]):
        assert line.startswith(f"  engine {e}  {rows}")
    y.free()
