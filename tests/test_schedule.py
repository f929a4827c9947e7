"""Pipeline schedules: pure, no cluster. Reference orders, the literature's bubble formulas, validity."""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbparallel.errors import UsageError
from nbparallel.pipeline import schedule as sched
from nbparallel.pipeline.schedule import (
    NAMES,
    Costs,
    Op,
    Recv,
    Schedule,
    ScheduleError,
    Send,
    build,
    comms,
    gpipe,
    interleaved,
    one_f_one_b,
    render,
    simulate,
    theoretical_bubble,
    validate,
    zb_h1,
)

FREE = Costs(f=1.0, b=2.0, i=1.0, w=1.0, comm=0.0)


def words(ops) -> str:
    return " ".join(map(str, ops))


# -- independent model of the rules, so the tests do not trust the module's own dependency code ------


def deps(op: Op, n_stages: int, split: bool) -> list[Op]:
    back = "I" if split else "B"
    if op.kind == "F":
        return [Op("F", op.stage - 1, op.mb)] if op.stage else []
    if op.kind == "W":
        return [Op("I", op.stage, op.mb)]
    return [Op("F", op.stage, op.mb)] + ([Op(back, op.stage + 1, op.mb)] if op.stage < n_stages - 1 else [])


def home(s: Schedule, stage: int) -> int:
    """The rank a stage lives on: round-robin, or a V for zb-v (rank r holds r and 2p-1-r)."""
    if s.name == "zb-v":
        return stage if stage < s.p else 2 * s.p - 1 - stage
    return stage % s.p


def critical_path(s: Schedule, costs: Costs) -> float:
    """Longest dependency chain, ignoring that a rank runs one op at a time: a lower bound on makespan."""
    split = any(op.kind in "IW" for ops in s.ranks for op in ops)
    n = s.p * s.v

    @functools.lru_cache(maxsize=None)
    def finish(op: Op) -> float:
        ready = max((finish(d) + (costs.comm if home(s, d.stage) != home(s, op.stage) else 0.0)
                     for d in deps(op, n, split)), default=0.0)
        return ready + costs.of(op, s.v)

    return max(finish(op) for ops in s.ranks for op in ops)


def expected_ops(s: Schedule) -> set[tuple[int, Op]]:
    kinds = "F" if not s.train else "FIW" if s.name in ("zb-h1", "interleaved-zb", "zb-v") else "FB"
    return {(home(s, st_), Op(k, st_, j)) for st_ in range(s.p * s.v) for j in range(s.m) for k in kinds}


def run_with_comms(s: Schedule) -> None:
    """Play :func:`comms` like a runtime would: sends never block, a Recv waits for its Send."""
    lists = comms(s)
    pos, sent = [0] * s.p, set()
    moved = True
    while moved:
        moved = False
        for r, acts in enumerate(lists):
            while pos[r] < len(acts):
                a = acts[pos[r]]
                if isinstance(a, Recv) and (a.peer, a.peer_stage, a.stage, a.what, a.mb) not in sent:
                    break
                if isinstance(a, Send):
                    sent.add((r, a.stage, a.peer_stage, a.what, a.mb))
                pos[r] += 1
                moved = True
    assert all(pos[r] == len(acts) for r, acts in enumerate(lists)), "comms() lists deadlock"


# -- reference orders ----------------------------------------------------------------------------------


def test_one_f_one_b_matches_the_reference_for_p4_m8():
    s = one_f_one_b(4, 8)
    assert [words(ops) for ops in s.ranks] == [
        "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
        "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
        "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
        "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
    ]
    assert [op.stage for op in s.ranks[2]] == [2] * 16
    assert s == build("1f1b", 4, 8) and (s.name, s.p, s.m, s.v, s.train) == ("1f1b", 4, 8, 1, True)


def test_gpipe_runs_backwards_in_ascending_order_and_inference_is_forward_only():
    assert words(gpipe(2, 3).ranks[1]) == "F0 F1 F2 B0 B1 B2"
    inf = build("gpipe", 3, 4, train=False)
    assert not inf.train and all(words(ops) == "F0 F1 F2 F3" for ops in inf.ranks)
    validate(inf)
    assert simulate(inf, FREE).peak_stash == (4, 4, 4)


def test_ops_are_hashable_values_with_short_names():
    op = Op("F", 5, 3)
    assert str(op) == "F3" and op.label(True) == "F3@s5" and op == Op("F", 5, 3)
    assert len({op, Op("F", 5, 3), Op("B", 5, 3)}) == 2
    with pytest.raises(AttributeError):
        op.mb = 4  # type: ignore[misc]
    s = interleaved(2, 2, 2)
    assert "F0@s2" in render(s)  # with v > 1 the stage is shown


# -- the literature's numbers --------------------------------------------------------------------------


@pytest.mark.parametrize("p,m", [(1, 1), (1, 5), (2, 1), (2, 4), (3, 2), (4, 8), (4, 16), (5, 3), (6, 12)])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(p, m):
    want = (p - 1) / (m + p - 1)
    for s in (gpipe(p, m), one_f_one_b(p, m)):
        assert abs(simulate(s, FREE).bubble - want) < 1e-9, s.name
        assert abs(theoretical_bubble(s.name, p, m) - want) < 1e-12
    assert abs(simulate(gpipe(p, m, train=False), FREE).bubble - want) < 1e-9


@pytest.mark.parametrize("p,m", [(1, 3), (2, 1), (3, 3), (4, 2), (4, 8), (6, 12)])
def test_1f1b_stashes_at_most_p_minus_r_and_gpipe_stashes_m(p, m):
    assert simulate(one_f_one_b(p, m), FREE).peak_stash == tuple(min(p - r, m) for r in range(p))
    assert simulate(gpipe(p, m), FREE).peak_stash == (m,) * p


@pytest.mark.parametrize("m", [8, 16])
def test_interleaved_v2_about_halves_the_1f1b_bubble(m):
    p, v = 4, 2
    inter, plain = simulate(interleaved(p, m, v), FREE), simulate(one_f_one_b(p, m), FREE)
    assert 0.4 <= inter.bubble / plain.bubble <= 0.65
    # Narayanan et al. (SC21): bubble time / ideal time = (p-1)/(v m). Each of the v chunks costs 1/v
    # of a rank's F+B, so the ideal time is still m (F+B) per rank.
    ideal = m * (FREE.f + FREE.b)
    ratio = (inter.makespan - ideal) / ideal
    assert ratio == pytest.approx((p - 1) / (v * m), rel=0.10)
    assert inter.bubble == pytest.approx(theoretical_bubble("interleaved", p, m, v), rel=0.10)


@pytest.mark.parametrize("p,m", [(2, 2), (3, 6), (4, 4), (4, 8), (6, 12)])
@pytest.mark.parametrize("costs", [Costs(f=1, b=2, i=1, w=1), Costs(f=1.5, b=2.0, i=1.2, w=0.8)])
def test_zb_h1_bubble_matches_qi_et_al_table_2(p, m, costs):
    # Qi et al. write T_B for the *input* backward (our I) and T_W for the weight backward (our W); the
    # 1F1B backward is T_B + T_W (our B = I + W). Bubble times: 1F1B (p-1)(T_F+T_B+T_W),
    # ZB-H1 (p-1)(T_F+T_B-T_W), stated for m >= p.
    f, i, w = costs.f, costs.i, costs.w
    ideal = m * (f + i + w)
    zb, plain = simulate(zb_h1(p, m), costs), simulate(one_f_one_b(p, m), costs)
    assert zb.makespan - ideal == pytest.approx((p - 1) * (f + i - w))
    assert plain.makespan - ideal == pytest.approx((p - 1) * (f + i + w))
    assert zb.makespan < plain.makespan
    # Same activation stash as 1F1B; with W's pending inputs counted, no rank exceeds 1F1B's peak (rank 0's).
    assert zb.peak_stash == plain.peak_stash
    assert max(zb.peak_inflight) <= max(plain.peak_stash)
    assert zb.bubble == pytest.approx(theoretical_bubble("zb-h1", p, m, costs=costs))


@pytest.mark.parametrize("p,m,zbv,zbh1", [(4, 8, 0.059, 0.111), (8, 16, 0.068, 0.127)])
def test_zero_bubble_v_about_halves_zb_h1s_bubble(p, m, zbv, zbh1):
    """The figures the issue computed from PyTorch's own orders, unit F, I and W."""
    unit = Costs(f=1, b=2, i=1, w=1)
    v, h = simulate(build("zb-v", p, m), unit), simulate(zb_h1(p, m), unit)
    assert round(v.bubble, 3) == zbv and round(h.bubble, 3) == zbh1
    assert round(simulate(build("interleaved-zb", p, m, 2), unit).bubble, 3) == zbv
    # Activations in half-rank stages: ZB-V holds 2p of them on every rank, 1F1B's p whole ones.
    assert max(v.peak_stash) == 2 * max(h.peak_stash)


def test_zb_v_is_pytorchs_order_for_p2_m4():
    """ScheduleZBVZeroBubble._calculate_single_rank_operations for 2 ranks, 4 micro-batches (its
    padding Nones dropped), transcribed by hand."""
    s = build("zb-v", 2, 4)
    assert s.v == 2 and [home(s, st_) for st_ in range(4)] == [0, 1, 1, 0]
    assert [" ".join(op.label(True) for op in ops) for ops in s.ranks] == [
        "F0@s0 F1@s0 F2@s0 F0@s3 I0@s3 W0@s3 F1@s3 I1@s3 W1@s3 F3@s0 I0@s0 W0@s0 F2@s3 I2@s3 W2@s3 "
        "I1@s0 W1@s0 F3@s3 I3@s3 W3@s3 I2@s0 W2@s0 I3@s0 W3@s0",
        "F0@s1 F0@s2 F1@s1 F1@s2 I0@s2 W0@s2 F2@s1 I0@s1 W0@s1 F2@s2 I1@s2 W1@s2 F3@s1 I1@s1 W1@s1 "
        "F3@s2 I2@s2 W2@s2 I2@s1 I3@s2 I3@s1 W2@s1 W3@s2 W3@s1",
    ]


def test_interleaved_takes_micro_batch_counts_that_are_not_a_multiple_of_p():
    # One round of 6 on 4 ranks: what PyTorch's ScheduleInterleaved1F1B runs for m=6.
    s = build("interleaved", 4, 6, 2)
    validate(s)
    assert [op.label(True) for op in s.ranks[3][:7]] == [
        "F0@s3", "F1@s3", "F2@s3", "F3@s3", "F4@s3", "F5@s3", "F0@s7"]
    assert simulate(s, FREE).bubble < simulate(one_f_one_b(4, 6), FREE).bubble


def test_theoretical_bubble_is_none_outside_the_closed_forms():
    assert theoretical_bubble("1f1b", 4, 8, costs=Costs(comm=0.1)) is None
    assert theoretical_bubble("zb-h1", 4, 2) is None  # Qi et al.'s formula assumes m >= p
    assert theoretical_bubble("zb-h1", 4, 8, costs=Costs(w=3, b=4)) is None
    assert theoretical_bubble("zb-h1", 4, 8) == pytest.approx(3 / 27)
    assert theoretical_bubble("interleaved", 4, 6, 2) is None  # no whole rounds of p
    assert theoretical_bubble("zb-v", 4, 8) is None and theoretical_bubble("interleaved-zb", 4, 8, 2) is None
    with pytest.raises(ScheduleError):
        theoretical_bubble("interleaved", 4, 9, 2)


def test_communication_cost_delays_cross_rank_dependencies_only():
    one = simulate(one_f_one_b(1, 4), Costs(comm=5.0))
    assert one.makespan == 12 and one.bubble == 0
    two = simulate(one_f_one_b(2, 1), Costs(comm=0.5))
    assert two.makespan == 1 + 0.5 + 1 + 2 + 0.5 + 2  # F, send, F, B (loss), send, B


# -- validity ------------------------------------------------------------------------------------------


def buildable(name: str, p: int, m: int, v: int) -> bool:
    """What the module should accept, restated: v > 1 only for the interleaved schedules (whose
    m must split into max(1, m // p) equal rounds, PyTorch's rule) and exactly v=2 for zb-v."""
    if name == "zb-v":
        return v == 2
    if name in ("interleaved", "interleaved-zb"):
        return m % max(1, m // p) == 0
    return v == 1


GRID = [(n, p, m, v) for n in NAMES for p in (1, 2, 3, 4) for m in (1, 2, 4, 5, 8) for v in (1, 2, 3)
        if buildable(n, p, m, v)]


@pytest.mark.parametrize("name,p,m,v", GRID)
def test_every_built_schedule_validates(name, p, m, v):
    s = build(name, p, m, v)
    validate(s)
    got = {(r, op) for r, ops in enumerate(s.ranks) for op in ops}
    assert got == expected_ops(s) and sum(map(len, s.ranks)) == len(got)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(NAMES), p=st.integers(1, 6), m=st.integers(1, 12), v=st.integers(1, 3),
       f=st.sampled_from([0.5, 1.0, 2.0]), i=st.sampled_from([0.5, 1.0]), w=st.sampled_from([0.25, 1.0]),
       comm=st.sampled_from([0.0, 0.1, 1.0]))
def test_property_every_schedule_is_a_valid_order(name, p, m, v, f, i, w, comm):
    if name == "zb-v" and v == 1:
        v = 2  # what build() makes of the default v
    if not buildable(name, p, m, v):
        with pytest.raises(ScheduleError):
            build(name, p, m, v)
        return
    s = build(name, p, m, v)
    validate(s)
    got = [(r, op) for r, ops in enumerate(s.ranks) for op in ops]
    assert len(got) == len(set(got)) and set(got) == expected_ops(s)  # each op once, on its rank
    costs = Costs(f=f, b=i + w, i=i, w=w, comm=comm)
    sim = simulate(s, costs)
    assert sim.makespan >= critical_path(s, costs) - 1e-9
    assert sim.makespan >= max(sim.busy) - 1e-9 and 0.0 <= sim.bubble < 1.0
    assert len(sim.spans) == len(got)
    for sp in sim.spans:  # each op after its dependencies, ranks never run two ops at once
        for d in deps(sp.op, s.p * s.v, name in ("zb-h1", "interleaved-zb", "zb-v")):
            end = next(x.end for x in sim.spans if x.op == d)
            assert sp.start >= end - 1e-9
    for r in range(p):
        spans = sorted((x for x in sim.spans if x.rank == r), key=lambda x: x.start)
        assert all(a.end <= b.start + 1e-9 for a, b in zip(spans, spans[1:]))
    run_with_comms(s)


def test_comms_place_sends_after_producers_and_receives_before_consumers():
    lists = comms(one_f_one_b(3, 2))
    assert [str(a) for a in lists[1][:3]] == ["recv act0 s1<-s0@r0", "F0", "send act0 s1->s2@r2"]
    for r, acts in enumerate(lists):
        for k, a in enumerate(acts):
            if isinstance(a, Send):
                prod = acts[k - 1]
                assert isinstance(prod, Op) and prod.mb == a.mb and prod.stage == a.stage
                assert a.peer == a.peer_stage % 3 != r
            if isinstance(a, Recv):
                cons = acts[k + 1]
                assert isinstance(cons, Op) and cons.mb == a.mb and cons.stage == a.stage
    sends = [a for acts in lists for a in acts if isinstance(a, Send)]
    assert len(sends) == 2 * 2 * 2  # 2 boundaries x 2 micro-batches x (activation + gradient)
    assert all(a == op for a, op in zip(comms(one_f_one_b(1, 3))[0], one_f_one_b(1, 3).ranks[0]))
    zb = comms(zb_h1(2, 2))
    assert not any(isinstance(a, (Send, Recv)) and a.what == "grad" and a.stage == 0 for a in zb[1])


def test_deadlocking_schedule_names_the_stuck_ops():
    # Rank 0 wants B0 before it has run F0, so nothing ever reaches rank 1.
    s = Schedule("mine", 2, 1, 1, ((Op("B", 0, 0), Op("F", 0, 0)), (Op("F", 1, 0), Op("B", 1, 0))), True)
    with pytest.raises(ScheduleError, match="deadlock") as e:
        validate(s)
    msg = str(e.value)
    assert "rank 0 is stuck at B0@s0" in msg and "rank 1 is stuck at F0@s1" in msg
    assert "F0@s0" in msg and "B0@s1" in msg
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(s)


def test_validate_rejects_missing_misplaced_and_duplicated_ops():
    good = one_f_one_b(2, 2)

    def with_ranks(*ranks, train=True):
        return Schedule("mine", 2, 2, 1, tuple(tuple(r) for r in ranks), train)

    with pytest.raises(ScheduleError, match="never runs B1"):
        validate(with_ranks(good.ranks[0][:-1], good.ranks[1]))
    with pytest.raises(ScheduleError, match="lives on rank 1"):
        validate(with_ranks(good.ranks[0] + (Op("F", 1, 0),), good.ranks[1][1:]))
    with pytest.raises(ScheduleError, match="twice"):
        validate(with_ranks(good.ranks[0] + (Op("F", 0, 0),), good.ranks[1]))
    with pytest.raises(ScheduleError, match="train=False"):
        validate(with_ranks(*good.ranks, train=False))
    with pytest.raises(ScheduleError, match="mixes"):
        validate(with_ranks(good.ranks[0], zb_h1(2, 2).ranks[1]))
    with pytest.raises(ScheduleError, match="2 ranks|p=2"):
        validate(with_ranks(good.ranks[0]))


@pytest.mark.parametrize("args,kwargs,needle", [
    (("pipedream-2bw", 4, 8), {}, "choose one of gpipe, 1f1b, interleaved, zb-h1, interleaved-zb, zb-v"),
    (("1f1b", 0, 8), {}, "p must be a whole number >= 1, got 0"),
    (("1f1b", 4, -1), {}, "m must be a whole number >= 1"),
    (("1f1b", 4, 2.5), {}, "m must be a whole number"),
    (("gpipe", True, 4), {}, "p must be a whole number"),
    (("interleaved", 4, 8, 0), {}, "v must be a whole number >= 1"),
    (("1f1b", 4, 8, 2), {}, "needs schedule 'interleaved'"),
    (("zb-h1", 4, 8), {"train": False}, "use 'gpipe' for inference"),
    (("interleaved", 4, 9, 2), {}, "m=9 with p=4 does not divide into 2 rounds: use m=8 or m=10"),
    (("interleaved-zb", 4, 11, 2), {}, "does not divide into 2 rounds: use m=10 or m=12"),
    (("zb-v", 4, 8, 3), {}, "zb-v puts exactly 2 stages on each rank (a V), not v=3; use v=2"),
])
def test_bad_names_and_values_raise_one_helpful_sentence(args, kwargs, needle):
    with pytest.raises(ScheduleError) as e:
        build(*args, **kwargs)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UsageError)
    assert str(e.value).endswith(".") and str(e.value).count(". ") == 0


def test_name_aliases_are_accepted():
    assert build("ZB_H1", 2, 2) == zb_h1(2, 2) and build("1F1B", 2, 2) == one_f_one_b(2, 2)


# -- rendering and purity ------------------------------------------------------------------------------


def test_render_lists_each_ranks_ops_the_bubble_and_a_timeline():
    s = one_f_one_b(4, 8)
    text = render(s)
    for ops in s.ranks:
        assert words(ops) in text
    assert "bubble 27.3% (theory 27.3%)" in text and "peak stash per rank 4 3 2 1" in text
    assert "timeline" not in text
    sim = simulate(s, FREE)
    pic = render(s, sim, width=80)
    rows = [line for line in pic.splitlines() if line.startswith("r") and "|" in line]
    assert len(rows) == 4 and all(len(line) <= 80 for line in pic.splitlines())
    assert rows[3].startswith("r3 |......F0B0--") and "." in rows[0]
    long = render(gpipe(2, 40), width=60)
    assert all(len(line) <= 60 for line in long.splitlines()[1:]) and "B39" in long
    zb = render(zb_h1(3, 3), simulate(zb_h1(3, 3)))
    assert "I0" in zb and "W0" in zb


def test_choose_module_imports_only_the_standard_library_and_the_schedules():
    from nbparallel.pipeline import choose

    tree = ast.parse(Path(choose.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module in (None, "schedule"), node.module
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
                assert n.split(".")[0] in sys.stdlib_module_names, n


def test_compare_lists_every_schedule_fastest_first_and_says_why_one_was_not_built():
    from nbparallel.pipeline import choose

    rows = choose.compare(4, 9, sched.Costs())
    built = [r for r in rows if not r.refused]
    assert {r.name for r in rows} == set(NAMES)
    assert {r.name for r in rows if r.refused} == {"interleaved", "interleaved-zb"}  # 9 on 4
    text = choose.table(rows)
    order = [line.split()[0] for line in text.splitlines()[1:len(built) + 1]]
    assert order == [r.name for r in sorted(built, key=lambda r: r.makespan)]
    assert "interleaved     not built: " in text and "use m=8 or m=10" in text
    one = {r.name: r for r in rows}["1f1b"]
    assert one.peak == 4 and one.sends == 2 * 3 * 9  # activations, and 2 transfers per hop per mb
    with pytest.raises(ScheduleError, match="--costs takes key=value pairs"):
        choose.parse_costs("fast")
    assert choose.parse_costs("f=2, i=0.5 w=0.5 comm=0.1") == sched.Costs(f=2, b=1.0, i=0.5, w=0.5, comm=0.1)


def test_schedule_module_imports_only_the_standard_library():
    for mod in (sched, sys.modules["nbparallel.pipeline"]):
        tree = ast.parse(Path(mod.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
                if node.level:
                    assert node.module == "errors", "only nbparallel.errors may be imported"
            else:
                continue
            for n in names:
                assert n.split(".")[0] in sys.stdlib_module_names, n
