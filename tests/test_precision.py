"""nbparallel.precision, without engines: the loss scaler against torch.amp.GradScaler's update
rule worked out by hand, the 16-bit casts and their rounding, and the errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from nbparallel import precision
from nbparallel.errors import UsageError
from nbparallel.precision import LossScaler, check_precision, low_dtype, nonfinite, to_high, to_low

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)



# -- the scaler: torch's _amp_update_scale_ step by step ----------------------------------------
def test_the_defaults_are_gradscalers():
    s = LossScaler()
    assert (s.scale, s.growth_factor, s.backoff_factor, s.growth_interval) == (65536.0, 2.0, 0.5, 2000)
    assert (s.skipped, s.growth_tracker, s.consecutive, s.max_skipped) == (0, 0, 0, 20)


def test_the_scale_grows_after_exactly_growth_interval_good_steps():
    s = LossScaler()
    for step in range(1, 2000):
        assert s.update(False) is False
        assert s.growth_tracker == step and s.scale == 65536.0
    assert s.update(False) is False  # the 2000th good step
    assert (s.scale, s.growth_tracker) == (131072.0, 0)
    for _ in range(1999):
        s.update(False)
    assert s.scale == 131072.0
    s.update(False)
    assert s.scale == 262144.0 and s.skipped == 0


def test_an_overflow_backs_off_skips_and_restarts_the_count():
    s = LossScaler()
    for _ in range(1500):
        s.update(False)
    assert s.update(True) is True
    assert (s.scale, s.growth_tracker, s.skipped, s.consecutive) == (32768.0, 0, 1, 1)
    assert s.update(True) is True
    assert (s.scale, s.skipped, s.consecutive) == (16384.0, 2, 2)
    assert s.update(False) is False
    assert (s.growth_tracker, s.consecutive, s.skipped) == (1, 0, 2)
    for _ in range(1998):  # 1999 good steps since the overflow: not yet
        s.update(False)
    assert s.scale == 16384.0 and s.growth_tracker == 1999
    s.update(False)
    assert s.scale == 32768.0 and s.growth_tracker == 0


def test_a_short_trajectory_matches_the_rule_worked_by_hand():
    s = LossScaler(init_scale=1024.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=3)
    steps = [False, False, True, False, False, False, True, True, False, False, False]
    # (scale, tracker) after each step, by _amp_update_scale_:
    #   good: tracker + 1, and at 3 the scale times 4 and tracker 0; overflow: scale / 4, tracker 0
    want = [(1024, 1), (1024, 2), (256, 0), (256, 1), (256, 2), (1024, 0), (256, 0), (64, 0),
            (64, 1), (64, 2), (256, 0)]
    got = []
    for found in steps:
        assert s.update(found) is found
        got.append((s.scale, s.growth_tracker))
    assert got == want and s.skipped == 3


def test_the_scale_is_a_float32_and_never_grows_to_inf():
    s = LossScaler(init_scale=2.0 ** 127, growth_interval=1)
    s.update(False)  # 2**128 is past float32: torch keeps the old scale
    assert s.scale == 2.0 ** 127 and s.growth_tracker == 0
    odd = LossScaler(init_scale=0.1, backoff_factor=0.3)
    odd.update(True)
    assert odd.scale == float(np.float32(float(np.float32(0.1)) * 0.3))


def test_twenty_consecutive_overflows_are_a_usage_error():
    s = LossScaler()
    for _ in range(10):
        s.update(True)
    s.update(False)  # a good step resets the run of skipped steps, not the total
    for _ in range(19):
        assert s.update(True) is True
    assert s.consecutive == 19 and s.skipped == 29
    with pytest.raises(UsageError) as info:
        s.update(True)
    message = str(info.value)
    assert message.startswith("fp16 overflowed in 20 consecutive steps, scale now 6.10352e-05:")
    assert s.scale == 65536.0 * 0.5 ** 30 == 2.0 ** -14
    for part in ("exceed fp16's range (65504)", "--precision bf16", "smaller inputs",
                 "a lower learning rate"):
        assert part in message
    assert "\n" not in message


def test_max_skipped_none_never_raises_and_the_bound_is_settable():
    s = LossScaler(max_skipped=None)
    for _ in range(200):
        s.update(True)
    assert s.skipped == 200
    t = LossScaler(max_skipped=2)
    t.update(True)
    with pytest.raises(UsageError, match="overflowed in 2 consecutive steps, scale now 16384"):
        t.update(True)


@pytest.mark.parametrize("kwargs, message", [
    ({"init_scale": 0}, "init_scale=0 must be a number above 0"),
    ({"growth_factor": 1.0}, "growth_factor=1.0 must be above 1"),
    ({"backoff_factor": 1.5}, "backoff_factor=1.5 must be between 0 and 1"),
    ({"growth_interval": 0}, "growth_interval=0 must be a whole number"),
    ({"max_skipped": 0}, "max_skipped=0 must be a whole number"),
])
def test_bad_scaler_settings_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        LossScaler(**kwargs)


def test_state_dict_round_trips_with_gradscalers_keys():
    s = LossScaler()
    for found in [False] * 7 + [True, False, False]:
        s.update(found)
    state = s.state_dict()
    assert {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} <= set(state)
    assert (state["scale"], state["_growth_tracker"]) == (32768.0, 2)
    t = LossScaler(init_scale=1.0)
    t.load_state_dict(state)
    assert t.state_dict() == state
    # A GradScaler's own state dict (only torch's keys) loads too.
    u = LossScaler()
    u.load_state_dict({"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                       "growth_interval": 10, "_growth_tracker": 9})
    u.update(False)
    assert (u.scale, u.growth_tracker, u.skipped) == (1024.0, 0, 0)
    with pytest.raises(UsageError, match="the state is empty"):
        u.load_state_dict({})


# -- casts -------------------------------------------------------------------------------------
def _data():
    rng = np.random.default_rng(7)
    sign = np.where(rng.random(10_000) < 0.5, -1.0, 1.0)
    return sign * np.exp(rng.uniform(-20, 20, 10_000))  # magnitudes 2e-9 .. 5e8


@pytest.mark.parametrize("name, dtype, unit", [("bf16", BF16, 2.0 ** -8), ("fp16", np.float16, 2.0 ** -11)])
def test_a_round_trip_is_within_16_bit_rounding(name, dtype, unit):
    x = _data()
    if name == "fp16":  # fp16's normal range: 6.1e-5 .. 65504
        x = np.clip(np.abs(x), 2.0 ** -14, 6e4) * np.sign(x)
    low = to_low(x, name)
    assert low.dtype == dtype and low is not x and low.shape == x.shape
    back = to_high(low)
    assert back.dtype == np.float32
    rel = np.abs(back.astype(np.float64) - x) / np.abs(x)
    assert rel.max() <= unit
    assert rel.max() > unit / 4  # it did round


def test_float32_inputs_and_fp16_overflow():
    x = np.array([1e5, -1e5, 65504.0, 65520.0, 1.0], np.float32)
    with np.errstate(all="raise"):  # the overflow is meant: no warning comes out of to_low
        low = to_low(x, "fp16")
    assert low.dtype == np.float16
    assert low.tolist() == [np.inf, -np.inf, 65504.0, np.inf, 1.0]
    assert nonfinite([low]) and not nonfinite([low[2:3], low[4:]])
    assert np.isfinite(to_low(np.array([1e5]), "bf16").astype(np.float64)).all()  # bf16: float32's range


@pytest.mark.parametrize("value", [
    np.arange(5), np.arange(5, dtype=np.int16), np.array([True, False]), 1.5, 3, None, "text",
    [1.0, 2.0], np.float64(2.5), np.ones(3, np.float16), np.ones(3, BF16), np.ones(2, np.complex128),
])
@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32"])
def test_everything_but_wide_float_arrays_is_unchanged(value, name):
    assert to_low(value, name) is value


def test_fp32_changes_nothing_and_to_high_leaves_wide_arrays_alone():
    x = np.ones(4)
    assert to_low(x, "fp32") is x and to_low(x, "float32") is x
    for v in (x, np.ones(2, np.float32), np.arange(3, dtype=np.int16), None, 1.0):
        assert to_high(v) is v
    assert to_high(np.ones(2, BF16)).dtype == np.float32


def test_nonfinite_finds_inf_and_nan_in_every_float_dtype():
    for dtype in (np.float64, np.float32, np.float16, BF16):
        ok = np.arange(6.0).astype(dtype)
        assert not nonfinite([ok]) and not nonfinite(ok)
        for bad in (np.inf, -np.inf, np.nan):
            worse = ok.copy()
            worse[3] = bad
            assert nonfinite([ok, worse]), (dtype, bad)
    assert not nonfinite([np.arange(3), None, 2.0, np.ones((0,))])
    assert nonfinite([float("nan")]) and nonfinite([complex(1, float("inf"))])
    assert not nonfinite([])


class FakeCupyArray:
    """Enough of a CuPy array: its type's module starts with cupy (nothing imports CuPy)."""

    def __init__(self, a):
        self.a = a
        self.dtype = a.dtype

    def astype(self, dtype):
        with np.errstate(over="ignore"):
            return FakeCupyArray(self.a.astype(dtype))

    def __sub__(self, other):
        with np.errstate(invalid="ignore"):
            return FakeCupyArray(self.a - other.a)

    def any(self):
        return self.a.any()


FakeCupyArray.__module__ = "cupy._core.core"


def test_cupy_arrays_cast_to_fp16_stay_as_they_are_under_bf16():
    x = FakeCupyArray(np.array([1.0, 1e5]))
    low = to_low(x, "fp16")
    assert type(low) is FakeCupyArray and low.dtype == np.float16
    assert to_low(x, "bf16") is x  # CuPy has no bfloat16
    assert to_high(low).dtype == np.float32
    assert nonfinite([low]) and not nonfinite([x])


# -- names and errors --------------------------------------------------------------------------
def test_names_and_aliases():
    assert [check_precision(n) for n in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert [check_precision(n) for n in ("float32", "bfloat16", "float16")] == ["fp32", "bf16", "fp16"]
    assert low_dtype("fp32") is None and low_dtype("fp16") == np.float16 and low_dtype("bf16") == BF16
    assert precision.PRECISIONS == ("fp32", "bf16", "fp16")


@pytest.mark.parametrize("name", ["fp8", "FP16", "", None, 16, "half"])
def test_an_unknown_precision_is_one_paragraph_naming_the_three(name):
    with pytest.raises(UsageError) as info:
        check_precision(name)
    message = str(info.value)
    assert message.startswith(f"unknown precision {name!r}; use fp32")
    assert all(n in message for n in ("fp32", "bf16", "fp16")) and "\n" not in message
    with pytest.raises(UsageError):
        to_low(np.ones(2), name)


def test_bf16_without_ml_dtypes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` now fails
    for call in (lambda: check_precision("bf16"), lambda: low_dtype("bfloat16"),
                 lambda: to_low(np.ones(2), "bf16")):
        with pytest.raises(UsageError) as info:
            call()
        assert 'pip install "nbparallel[mixed]"' in str(info.value)
        assert "ml_dtypes" in str(info.value) and "\n" not in str(info.value)
    # fp16 and fp32 need nothing, and a bfloat16 array is still recognised by its name.
    assert to_low(np.ones(2), "fp16").dtype == np.float16 and check_precision("fp32") == "fp32"
    assert to_high(np.ones(2, BF16)).dtype == np.float32


def test_the_module_imports_ml_dtypes_only_for_bf16(monkeypatch):
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(precision))
    where = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             for node in ast.walk(f) if isinstance(node, ast.Import)
             and any(a.name == "ml_dtypes" for a in node.names)]
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
           and "ml_dtypes" in ast.unparse(node)]
    assert where == ["_ml_dtypes"] and top == []
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # everything but bf16 runs without it
    assert to_low(np.ones(2), "fp16").dtype == np.float16 and low_dtype("fp32") is None
    assert nonfinite([np.ones(2), np.ones(2, BF16)]) is False
    assert LossScaler().update(True) is True
