"""Arrays that live in the pool's shared memory, so that scattering them copies nothing.

``%%scatter`` copies a notebook array once, into shared memory the engines of this host map. An
array that is already there (a gathered result, or one made here) is handed over where it lies:
each engine maps its piece, and the transfer records 0 bytes copied. Two rules keep that safe:

- what a cell writes into its piece stays on its engine (the piece is mapped copy-on-write), and
  a broadcast one is read-only there, as always;
- the notebook cannot change the array while a cell runs (the cell waits), but a piece an engine
  keeps past its cell (``--keep`` of a view of it, or a global) sees later changes made in the
  notebook. Scatter ``a.copy()`` to send a snapshot instead.

Pieces must be contiguous (split along axis 0 of a C-ordered array, the default); others are
copied as before. Engines on other hosts get the bytes over their channel as always.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import format as fmt
from .dataplane.shm import NoRoom
from .errors import UsageError
from .session import Session, resolve

__all__ = ["shared", "asshared"]


def shared(shape: int | Sequence[int], dtype: Any = np.float64, *,
           pool: Session | None = None) -> np.ndarray:
    """A zeroed array in the pool's shared memory; ``%%scatter`` hands it to this host's engines
    without a copy. Its memory is the pool's until the array (and every view of it) is gone.

    >>> a = nbparallel.shared((1_000_000, 8))
    >>> a[:] = data                       # fill it once
    >>> # %%scatter a --gather b  ->  0 bytes copied for a
    """
    session = resolve(pool)
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(n) for n in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    arena = session.plane.arena
    try:
        seg = arena.lease(nbytes)
    except NoRoom as exc:
        raise UsageError(
            f"nbparallel.shared: {fmt.nbytes(nbytes)} do not fit in the pool's shared memory "
            f"({exc}). Use a plain NumPy array (scattering it copies it once), or raise the "
            f"budget with NBPARALLEL_SHM_BUDGET.") from None
    token = seg.token(0, nbytes)
    token[:] = 0  # a reused segment still holds what it carried last
    arena.lend(seg, token)
    return token.view(dtype).reshape(shape)


def asshared(a: Any, *, pool: Session | None = None) -> np.ndarray:
    """``a`` copied once into the pool's shared memory (see :func:`shared`); an array already
    there is returned as it is.

    >>> x = nbparallel.asshared(x)        # later scatters of x copy nothing
    """
    session = resolve(pool)
    a = np.asarray(a)
    if session.plane.arena.locate(a) is not None:
        return a
    out = shared(a.shape, a.dtype, pool=session)
    np.copyto(out, a)
    return out
