"""Mixed precision: 16 bits between engines, float32 master weights everywhere.

What crosses from one engine to another (activations and gradients between pipeline stages,
the arrays of a ``comm.allreduce(..., compress="bf16")``) can travel in 16 bits: half the bytes
of float32, a quarter of float64. What each engine keeps and updates (the master weights, the
optimizer's state, the sums of a reduction) stays float32, so the rounding of one step does not
pile up over thousands of steps.

The two 16-bit formats are not the same trade:

* ``bf16`` (bfloat16) keeps float32's exponent and drops mantissa bits: the same range (up to
  about 3.4e38), 8 significant bits (a relative rounding of at most 2**-8). Nothing overflows
  that did not overflow in float32, so it needs no loss scaling. NumPy has no bfloat16 of its
  own: it comes from ``ml_dtypes`` (``pip install "nbparallel[mixed]"``).
* ``fp16`` (IEEE half) keeps 11 significant bits (at most 2**-11) but only reaches 65504, and
  values below about 6e-5 lose precision (below 6e-8 they vanish). Small gradients underflow,
  so the loss is multiplied by a large factor before the backward pass and the gradients divided
  by it afterwards: :class:`LossScaler` picks that factor the way ``torch.amp.GradScaler`` does,
  halving it (and skipping the step) when a gradient overflowed, doubling it after a long run of
  good steps.

>>> import numpy as np
>>> x = np.array([1.0, 1 / 3, 1e5])
>>> to_low(x, "fp16")                              # what would travel: 1e5 is past fp16's range
array([1.    , 0.3333,    inf], dtype=float16)
>>> to_high(to_low(x[:2], "fp16")).dtype           # back to float32 on arrival
dtype('float32')
>>> scaler = LossScaler()
>>> scaler.update(found_inf=nonfinite([to_low(x, "fp16")])), scaler.scale
(True, 32768.0)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import UsageError

__all__ = ["PRECISIONS", "check_precision", "low_dtype", "to_low", "to_high", "nonfinite",
           "LossScaler"]

#: The precisions by canonical name: float32 throughout, or 16 bits between engines.
PRECISIONS = ("fp32", "bf16", "fp16")
#: Other spellings accepted for them (NumPy's and PyTorch's dtype names).
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
#: The largest finite float16.
FP16_MAX = 65504.0


def check_precision(name: str) -> str:
    """``name`` as one of :data:`PRECISIONS` (an alias such as ``"bfloat16"`` gives its canonical
    name); a :class:`~nbparallel.UsageError` if it is none of them, or if it is ``bf16`` and
    ml_dtypes (which provides NumPy's bfloat16) is not installed.

    >>> check_precision("bfloat16"), check_precision("fp16")
    ('bf16', 'fp16')
    """
    canonical = ALIASES.get(name, name) if isinstance(name, str) else None
    if canonical not in PRECISIONS:
        raise UsageError(
            f"unknown precision {name!r}; use fp32 (float32 everywhere), bf16 (bfloat16 between "
            f"engines: float32's range, no loss scaling needed) or fp16 (float16 between engines: "
            f"more precise than bf16, but its range ends at 65504, so losses are scaled).")
    if canonical == "bf16":
        _ml_dtypes()
    return canonical


def low_dtype(name: str) -> np.dtype | None:
    """The 16-bit dtype of precision ``name``: None for fp32, ml_dtypes' bfloat16 for bf16,
    ``numpy.float16`` for fp16.

    >>> low_dtype("fp16"), low_dtype("fp32")
    (dtype('float16'), None)
    """
    name = check_precision(name)
    if name == "fp32":
        return None
    if name == "fp16":
        return np.dtype(np.float16)
    return np.dtype(_ml_dtypes().bfloat16)


def to_low(value: Any, name: str) -> Any:
    """``value`` as it travels under precision ``name``: a floating array wider than 16 bits
    (float32, float64) becomes a new array of the 16-bit dtype; anything else (integer and bool
    arrays, arrays already 16-bit, numbers, None, other objects) comes back unchanged, as does
    everything under fp32. Values past fp16's range become ``inf`` under fp16.

    A CuPy array is cast on its device under fp16; under bf16 it comes back unchanged (CuPy has
    no bfloat16 dtype), so it travels as it is.
    """
    low = low_dtype(name)
    if low is None or not _wide_float(value):
        return value
    if type(value).__module__.startswith("cupy"):
        return value.astype("float16") if low == np.float16 else value
    with np.errstate(over="ignore"):  # past fp16's range is inf, as said
        return value.astype(low)


def to_high(value: Any) -> Any:
    """A 16-bit floating array (bfloat16 or float16, NumPy or CuPy) as a new float32 array;
    anything else unchanged.

    >>> to_high(np.ones(2, np.float16)).dtype, to_high(np.ones(2, np.int16)).dtype
    (dtype('float32'), dtype('int16'))
    """
    dtype = getattr(value, "dtype", None)
    if dtype is None or not hasattr(value, "astype") or not _is_low(dtype):
        return value
    return value.astype("float32")


def nonfinite(arrays: Any) -> bool:
    """Whether any of ``arrays`` (an iterable of arrays, or one array) holds an inf or a NaN.
    Works for every floating dtype, bfloat16 included, for NumPy and CuPy arrays (a CuPy array
    is checked on its device); integer arrays and None are skipped, Python numbers checked.

    >>> nonfinite([np.ones(3), np.array([1.0, np.nan])]), nonfinite(np.ones(2, np.float16))
    (True, False)
    """
    if not isinstance(arrays, (list, tuple)) and hasattr(arrays, "dtype"):
        arrays = [arrays]
    for a in arrays:
        if a is None:
            continue
        dtype = getattr(a, "dtype", None)
        if dtype is None:
            if isinstance(a, (float, complex)) and not _finite_number(a):
                return True
            continue
        if not (dtype.kind in "fc" or _is_low(dtype)):
            continue
        if isinstance(a, (np.ndarray, np.generic)):
            if not np.isfinite(a).all():
                return True
        elif (a - a).any():  # any array type (CuPy): x - x is 0 for every finite x, NaN otherwise
            return True
    return False


class LossScaler:
    """Dynamic loss scaling with the semantics of ``torch.amp.GradScaler`` (same defaults: the
    scale starts at ``init_scale``, is multiplied by ``backoff_factor`` and the step skipped when
    a gradient overflowed, and multiplied by ``growth_factor`` after ``growth_interval``
    consecutive good steps; like torch, the scale is a float32 and never grows to inf).

    One addition: after ``max_skipped`` consecutive skipped steps :meth:`update` raises a
    :class:`~nbparallel.UsageError`, since fp16 that overflows at every scale will not recover
    by itself (``max_skipped=None``: never).

    >>> scaler = LossScaler(init_scale=8.0, growth_interval=2)
    >>> [scaler.update(f) for f in (True, False, False)], scaler.scale, scaler.skipped
    ([True, False, False], 8.0, 1)

    ``scale`` is the factor now; ``skipped`` the steps skipped in all; ``growth_tracker`` the
    good steps since the scale last changed; ``consecutive`` the skipped steps in a row.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 max_skipped: int | None = 20):
        if not (isinstance(init_scale, (int, float)) and 0 < init_scale < math.inf):
            raise UsageError(f"LossScaler: init_scale={init_scale!r} must be a number above 0.")
        if not (isinstance(growth_factor, (int, float)) and growth_factor > 1):
            raise UsageError(f"LossScaler: growth_factor={growth_factor!r} must be above 1.")
        if not (isinstance(backoff_factor, (int, float)) and 0 < backoff_factor < 1):
            raise UsageError(f"LossScaler: backoff_factor={backoff_factor!r} must be between 0 and 1.")
        if not (isinstance(growth_interval, int) and not isinstance(growth_interval, bool)
                and growth_interval >= 1):
            raise UsageError(f"LossScaler: growth_interval={growth_interval!r} must be a whole "
                             f"number of steps, 1 or more.")
        if max_skipped is not None and not (isinstance(max_skipped, int) and max_skipped >= 1):
            raise UsageError(f"LossScaler: max_skipped={max_skipped!r} must be a whole number of "
                             f"steps, 1 or more, or None for no bound.")
        self.scale = _f32(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = growth_interval
        self.max_skipped = max_skipped
        self.growth_tracker = 0
        self.skipped = 0
        self.consecutive = 0

    def __repr__(self) -> str:
        return (f"<LossScaler scale={self.scale:g} skipped={self.skipped} "
                f"growth_tracker={self.growth_tracker}>")

    def update(self, found_inf: bool) -> bool:
        """Record one step (``found_inf``: whether a gradient had an inf or NaN, e.g. from
        :func:`nonfinite`) and adjust the scale; returns whether the step is to be skipped."""
        if found_inf:
            self.scale = _f32(self.scale * self.backoff_factor)
            self.growth_tracker = 0
            self.skipped += 1
            self.consecutive += 1
            if self.max_skipped is not None and self.consecutive >= self.max_skipped:
                raise UsageError(
                    f"fp16 overflowed in {self.consecutive} consecutive steps, scale now "
                    f"{self.scale:g}: activations or gradients exceed fp16's range ({FP16_MAX:g}) "
                    f"even with the loss scaled down that far. Try --precision bf16 (float32's "
                    f"range), smaller inputs or a lower learning rate.")
            return True
        self.consecutive = 0
        successful = self.growth_tracker + 1
        if successful == self.growth_interval:
            grown = _f32(self.scale * self.growth_factor)
            if math.isfinite(grown):  # as torch: never past float32's range to inf
                self.scale = grown
            self.growth_tracker = 0
        else:
            self.growth_tracker = successful
        return False

    def state_dict(self) -> dict[str, Any]:
        """The keys of ``torch.amp.GradScaler.state_dict()``, plus this scaler's own counters."""
        return {"scale": self.scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": self.growth_tracker, "skipped": self.skipped,
                "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (this scaler's or a GradScaler's)."""
        if not state:
            raise UsageError("LossScaler.load_state_dict: the state is empty (saved from a "
                             "disabled scaler?); pass what state_dict() returned.")
        self.scale = _f32(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.growth_tracker = int(state["_growth_tracker"])
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


def _ml_dtypes() -> Any:
    try:
        import ml_dtypes
    except ImportError:
        raise UsageError(
            'precision bf16 needs ml_dtypes (NumPy has no bfloat16 of its own): pip install '
            '"nbparallel[mixed]" (or pip install ml_dtypes) in the notebook\'s environment and '
            'the engines\', or use fp16.') from None
    return ml_dtypes


def _is_low(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is a 16-bit float (bfloat16 is named without importing ml_dtypes)."""
    return dtype == np.float16 or dtype.name == "bfloat16"


def _wide_float(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is None or not (isinstance(value, np.ndarray) or type(value).__module__.startswith("cupy")):
        return False
    return dtype.kind == "f" and dtype.itemsize > 2


def _finite_number(x: float | complex) -> bool:
    return math.isfinite(x.real) and math.isfinite(x.imag) if isinstance(x, complex) else math.isfinite(x)


def _f32(x: float) -> float:
    """``x`` rounded to float32, as torch keeps the scale (inf past its range)."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))
