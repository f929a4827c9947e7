"""How a rank's contribution to one round is laid out in memory another rank reads.

A round's contribution is a list of items, one for everyone or one per destination rank. An item
is ``None``, a NumPy array (its bytes, never pickled), a tuple of items, or any other object
(cloudpickled). :func:`encode` turns the items into a small index plus the frames of bytes to
place; :func:`decode` reads one item back from the placed bytes, as views or as copies.
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

import cloudpickle
import numpy as np

__all__ = ["encode", "decode", "place", "nbytes", "item_bytes"]

ALIGN = 64


def encode(items: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``(index, frames)``: ``index[i]`` describes ``items[i]``; frames are bytes-like."""
    frames: list[Any] = []
    return [_encode(item, frames) for item in items], frames


def _encode(item: Any, frames: list[Any]) -> Any:
    if item is None:
        return None
    if isinstance(item, np.ndarray) and not item.dtype.hasobject:
        frames.append(item if item.flags.c_contiguous else np.ascontiguousarray(item))
        # A plain dtype travels as its short string: pickling the dtype object costs more than
        # the rest of a small round together.
        # Not for dtypes whose string says only "raw bytes" (ml_dtypes' bfloat16 is "<V2").
        plain = item.dtype.fields is None and not item.dtype.subdtype and item.dtype.kind != "V"
        dtype = item.dtype.str if plain else item.dtype
        return ("a", len(frames) - 1, dtype, item.shape)
    if isinstance(item, tuple):
        return ("t", [_encode(x, frames) for x in item])
    try:  # plain pickle is several times faster for numbers and containers of them
        frames.append(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
    except (pickle.PicklingError, AttributeError, TypeError):  # lambdas, classes of the cell
        frames.append(cloudpickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
    return ("p", len(frames) - 1)


def place(frames: Sequence[Any], start: int = 0) -> tuple[list[tuple[int, int]], int]:
    """Aligned ``(offset, nbytes)`` of each frame from ``start``, and the end of the last."""
    spans, end = [], start
    for frame in frames:
        n = frame.nbytes if isinstance(frame, np.ndarray) else len(frame)
        spans.append((end, n))
        end = (end + n + ALIGN - 1) // ALIGN * ALIGN
    return spans, end


def nbytes(frames: Sequence[Any]) -> int:
    return sum(f.nbytes if isinstance(f, np.ndarray) else len(f) for f in frames)


def decode(spec: Any, buf: np.ndarray, spans: Sequence[tuple[int, int]], copy: bool) -> Any:
    """Item ``spec`` over ``buf`` (uint8) whose frames sit at ``spans``.

    With ``copy`` False arrays are views of ``buf``: valid only until its writer's next round.
    """
    if spec is None:
        return None
    kind = spec[0]
    if kind == "a":
        _, frame, dtype, shape = spec
        offset, n = spans[frame]
        view = buf[offset:offset + n].view(dtype).reshape(shape)
        return view.copy() if copy else view
    if kind == "t":
        return tuple(decode(s, buf, spans, copy) for s in spec[1])
    offset, n = spans[spec[1]]
    return pickle.loads(buf[offset:offset + n])


def item_bytes(spec: Any, spans: Sequence[tuple[int, int]]) -> int:
    """Bytes an item's frames hold (for the bytes-moved accounting)."""
    if spec is None:
        return 0
    if spec[0] == "t":
        return sum(item_bytes(s, spans) for s in spec[1])
    return spans[spec[1]][1]
