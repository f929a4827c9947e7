"""Reduction operations and the one-line descriptions that collectives are matched by.

Every rank reduces in rank order (rank 0's value first), so every rank that computes a block
gets the same bits, and the result does not depend on which rank computed it.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import CommError

__all__ = ["OPS", "check_op", "reduce_into", "reduce_wide", "reduce_values", "describe", "dtype_name",
           "as_array"]

#: op name -> (NumPy ufunc for arrays, Python function for other objects)
OPS: dict[str, tuple[np.ufunc, Callable[[Any, Any], Any]]] = {
    "sum": (np.add, operator.add),
    "prod": (np.multiply, operator.mul),
    "min": (np.minimum, min),
    "max": (np.maximum, max),
}


def check_op(op: str, call: str) -> None:
    if op not in OPS:
        raise CommError(
            f"comm.{call}: unknown op {op!r}; use one of {', '.join(OPS)} (op=\"sum\" adds the "
            f"values of every rank)."
        )


def reduce_into(op: str, parts: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """``out = parts[0] op parts[1] op ...``, in rank order, without temporaries."""
    ufunc = OPS[op][0]
    if len(parts) == 1:
        np.copyto(out, parts[0])
        return out
    ufunc(parts[0], parts[1], out=out)
    for part in parts[2:]:
        ufunc(out, part, out=out)
    return out


def reduce_wide(op: str, parts: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Like :func:`reduce_into`, but computed in ``out``'s dtype: 16-bit parts (bfloat16, float16)
    reduced into a float32 ``out`` are each widened first, not added in 16 bits."""
    ufunc, dtype = OPS[op][0], out.dtype
    if len(parts) == 1:
        out[...] = parts[0]
        return out
    ufunc(parts[0], parts[1], out=out, dtype=dtype)
    for part in parts[2:]:
        ufunc(out, part, out=out, dtype=dtype)
    return out


def reduce_values(op: str, values: Sequence[Any]) -> Any:
    """Reduce Python objects (or small arrays) in rank order."""
    if type(values[0]) is np.ndarray and all(isinstance(v, np.ndarray) for v in values):
        return reduce_into(op, values, np.empty_like(values[0]))
    return functools.reduce(OPS[op][1], values)


def as_array(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array to reduce without pickling (arrays and NumPy/Python numbers),
    or None for any other object (reduced as objects: Python ints of any size, fractions...)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (np.generic, float, complex, bool)) or (
            isinstance(value, int) and -(1 << 63) <= value < (1 << 63)):
        return np.asarray(value)
    return None


_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)``, remembered: NumPy builds the name anew each time, in microseconds."""
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = str(dtype)
    return name


def describe(call: str, value: Any = None, **options: Any) -> str:
    """What a call looks like to the others: ``allreduce(float64 (1000,), op=sum)``."""
    parts = []
    if isinstance(value, np.ndarray):
        parts.append(f"{dtype_name(value.dtype)} {value.shape}")
    elif value is not None:
        parts.append(type(value).__name__)
    parts += [f"{k}={v}" for k, v in options.items()]
    return f"{call}({', '.join(parts)})"
