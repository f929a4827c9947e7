"""Tensor-parallel linear layers (Megatron-LM style) for cells whose engines share a ``comm``.

Why: a layer too wide for one engine, or too slow on one, can be cut across the engines of a
cell. Megatron-LM's pair of layers does it with as little talk as possible. A
:class:`ColumnParallelLinear` keeps a block of the output columns of ``W``: its forward needs no
communication (every rank has the whole input) and gives this rank's block of the output; its
backward all-reduces the input gradient. A :class:`RowParallelLinear` keeps the matching block of
rows: it takes that column block as its input, all-reduces the output in its forward, and needs
no communication in its backward. Put one after the other (column, an elementwise activation, row)
and a two-layer MLP costs exactly one all-reduce forward and one backward, whatever the number
of ranks (Megatron's conjugate operators *f* and *g*).

Each layer is built from the FULL weight, ``(in, out)`` as in ``y = x @ W + b``, and keeps a
contiguous copy of its own block. Columns and rows are split with ``numpy.array_split``'s rule
(:func:`split_bounds`): with ``n`` over ``size`` ranks the first ``n % size`` ranks get one more.
Arrays are NumPy or CuPy, following the weight's type (CuPy is never imported here: a CuPy weight
means it is loaded already). ``ctx`` is a dict for one micro-batch, like a pipeline stage's: the
forward saves its input there under a key of its own and the backward takes it out again.

A two-layer MLP as a tensor-parallel pipeline stage over two engines (the cell gets ``comm``,
``tp_rank`` and ``tp_size``; ``W1``, ``b1``, ``W2``, ``b2`` are the full layer's, from the
notebook): one all-reduce in ``forward``, one in ``backward``, each rank keeping half of
the hidden units::

    %%stage mlp --engines 0,1
    from nbparallel.tp import ColumnParallelLinear, RowParallelLinear, sgd
    fc1 = ColumnParallelLinear(W1, b1, rank=tp_rank, size=tp_size)   # a block of W1's columns
    fc2 = RowParallelLinear(W2, b2, rank=tp_rank, size=tp_size)      # the same rows of W2
    def forward(x, ctx):
        ctx["h"] = h = xp.tanh(fc1.forward(x, ctx))  # (batch, hidden / size): no communication
        return fc2.forward(h, ctx, comm)             # (batch, out), whole: one all-reduce
    def backward(grad, ctx):
        gh = fc2.backward(grad, ctx) * (1 - ctx["h"] ** 2)    # no communication
        return fc1.backward(gh, ctx, comm)           # (batch, in), whole: one all-reduce
    def step():
        sgd(fc1.parameters() + fc2.parameters(), fc1.gradients() + fc2.gradients(), lr=0.1)

The same in a ``%%scatter`` cell, one forward and backward, equal to one process (output, input
gradient and every weight gradient; tested): ``y`` and ``gx`` are whole on every rank, and
``gW1`` comes back whole (each rank's rows of ``dW1.T``, joined in rank order)::

    %%scatter --broadcast x W1 b1 W2 b2 gy --gather gW1 --reduce y=list
    from nbparallel.tp import ColumnParallelLinear, RowParallelLinear
    fc1 = ColumnParallelLinear(W1, b1, rank=rank, size=size)
    fc2 = RowParallelLinear(W2, b2, rank=rank, size=size)
    ctx = {}
    h = xp.tanh(fc1.forward(x, ctx))
    y = fc2.forward(h, ctx, comm)
    gx = fc1.backward(fc2.backward(gy, ctx) * (1 - h ** 2), ctx, comm)
    gW1 = fc1.grad_weight.T

With ``size=1`` the layers are plain linear layers and need no comm at all:

>>> import numpy as np
>>> fc = ColumnParallelLinear(np.arange(6.0).reshape(2, 3), np.ones(3), rank=0, size=1)
>>> ctx = {}
>>> fc.forward(np.array([[1.0, 1.0]]), ctx)
array([[4., 6., 8.]])
>>> fc.backward(np.ones((1, 3)), ctx, None)
array([[ 3., 12.]])
>>> fc.grad_weight
array([[1., 1., 1.],
       [1., 1., 1.]])
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, Sequence

import numpy as np

from .errors import UsageError
from .partition import bounds

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "split_bounds", "gather_columns", "sgd"]

#: Numbers the layers, so that each saves its input in ``ctx`` under a key of its own.
_layer_ids = itertools.count()


def split_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each rank's block when ``n`` columns or rows are split over ``size``
    ranks, exactly as ``numpy.array_split`` splits them: the first ``n % size`` ranks get one
    more. (With ``n < size`` the last blocks are empty, as in ``array_split``; the layers refuse
    that.)

    >>> split_bounds(16, 3)
    [(0, 6), (6, 11), (11, 16)]
    >>> split_bounds(4, 2)
    [(0, 2), (2, 4)]
    """
    if not _whole(n) or n < 0:
        raise UsageError(f"split_bounds: n={n!r} must be a whole number of columns or rows, 0 or more.")
    if not _whole(size) or size < 1:
        raise UsageError(f"split_bounds: size={size!r} must be a whole number of ranks, 1 or more "
                         f"(comm.size in a cell).")
    return bounds(int(n), int(size))


class _Layer:
    """What both layers share: their parameters and gradients as lists, for an optimizer."""

    weight: Any
    bias: Any
    grad_weight: Any
    grad_bias: Any

    def parameters(self) -> list[Any]:
        """``[weight, bias]`` (bias only if there is one): this rank's blocks, the arrays
        themselves, so that an optimizer updates them in place (see :func:`sgd`).

        >>> import numpy as np
        >>> [p.shape for p in RowParallelLinear(np.zeros((4, 3)), np.zeros(3), rank=0, size=2).parameters()]
        [(2, 3), (3,)]
        """
        return [self.weight] + ([] if self.bias is None else [self.bias])

    def gradients(self) -> list[Any]:
        """``[grad_weight, grad_bias]``, in the order of :meth:`parameters`::

            sgd(fc1.parameters() + fc2.parameters(), fc1.gradients() + fc2.gradients(), lr=0.1)
        """
        return [self.grad_weight] + ([] if self.grad_bias is None else [self.grad_bias])

    def zero_grad(self) -> None:
        """Set the accumulated gradients to zero, in place (:func:`sgd` does it after its step)::

            fc1.zero_grad(); fc2.zero_grad()      # start a mini-batch afresh
        """
        for g in self.gradients():
            g[...] = 0


class ColumnParallelLinear(_Layer):
    """``y_local = x @ W[:, cols] (+ b[cols])``, where ``cols`` is this rank's block of the
    output columns (``numpy.array_split``'s rule: the first ``out % size`` ranks get one more).

    Built from the FULL ``weight`` of shape ``(in, out)`` and ``bias`` of shape ``(out,)``; it
    keeps a contiguous copy of its columns in ``weight`` and ``bias``, and their accumulated
    gradients in ``grad_weight`` and ``grad_bias`` (zeros to begin with). ``cols`` is the
    ``(lo, hi)`` of the full layer's columns it holds. Its :meth:`forward` takes the full input,
    the same on every rank, and needs no communication; its :meth:`backward` returns the full
    input gradient, summed over the ranks with one ``comm.allreduce``::

        fc1 = ColumnParallelLinear(W1, b1, rank=comm.rank, size=comm.size)
        h_local = fc1.forward(x, ctx)                 # (batch, fc1.cols[1] - fc1.cols[0])
        gx = fc1.backward(gh_local, ctx, comm)        # (batch, in), identical on every rank

    >>> import numpy as np
    >>> ColumnParallelLinear(np.zeros((4, 5)), rank=1, size=2).cols
    (3, 5)
    """

    def __init__(self, weight: Any, bias: Any = None, *, rank: int, size: int):
        xp, weight, bias = _parameters(type(self).__name__, weight, bias, rank, size, "column")
        self.xp = xp
        self.rank, self.size = int(rank), int(size)
        self.in_features, self.out_features = (int(d) for d in weight.shape)
        self.cols: tuple[int, int] = split_bounds(self.out_features, self.size)[self.rank]
        lo, hi = self.cols
        self.weight = weight[:, lo:hi].copy()
        self.bias = None if bias is None else bias[lo:hi].copy()
        self.grad_weight = xp.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else xp.zeros_like(self.bias)
        self._key = f"tp.ColumnParallelLinear.{next(_layer_ids)}.x"

    def __repr__(self) -> str:
        lo, hi = self.cols
        return (f"<ColumnParallelLinear {self.in_features}->{self.out_features}, rank {self.rank} "
                f"of {self.size}: columns {lo}:{hi}>")

    def forward(self, x: Any, ctx: dict) -> Any:
        """This rank's block of ``x @ W + b``, shape ``(..., hi - lo)``; ``x`` is the FULL input
        ``(..., in)``, identical on every rank. Saves ``x`` in ``ctx`` for :meth:`backward`.

        >>> import numpy as np
        >>> fc = ColumnParallelLinear(np.eye(2), rank=0, size=1)
        >>> fc.forward(np.array([3.0, 4.0]), {})
        array([3., 4.])
        """
        x = _input(self, x, self.in_features, "the full input: every rank passes the whole x")
        _ctx(self, ctx, "forward")
        y = x @ self.weight
        if self.bias is not None:
            y += self.bias
        ctx[self._key] = x
        return y

    def backward(self, grad_y_local: Any, ctx: dict, comm: Any) -> Any:
        """The FULL input gradient ``(..., in)``, summed over the ranks with one
        ``comm.allreduce`` (none with ``size == 1``, where ``comm`` may be None); adds this
        micro-batch's gradients to ``grad_weight`` and ``grad_bias``. ``grad_y_local`` is the
        gradient of this rank's block of the output. Takes the saved input out of ``ctx``.

        >>> gx = fc1.backward(gh_local, ctx, comm)    # doctest: +SKIP
        """
        _comm(self, comm, "backward")
        x = _saved(self, ctx)
        g = _grad(self, grad_y_local, x, self.cols[1] - self.cols[0], "this rank's columns")
        _accumulate(self, x, g)
        grad_x = g @ self.weight.T
        del ctx[self._key]
        if self.size == 1:
            return grad_x
        return _allreduce(grad_x, comm, self.xp)

class RowParallelLinear(_Layer):
    """``y = sum over ranks of x_local @ W[rows, :] (+ b)``: the input is split by columns (the
    output of a :class:`ColumnParallelLinear` of the same ``size``), the output is whole and the
    same on every rank. ``rows`` follow ``numpy.array_split``'s rule like the column layer's
    ``cols``, so ``fc2.rows == fc1.cols`` when ``fc1``'s outputs feed ``fc2``.

    Built from the FULL ``weight`` ``(in, out)``; it keeps a contiguous copy of its rows. The
    ``bias`` ``(out,)`` is replicated: added once, after the all-reduce, and its gradient is the
    same on every rank. Its :meth:`forward` all-reduces the partial products once; its
    :meth:`backward` needs no communication::

        fc2 = RowParallelLinear(W2, b2, rank=comm.rank, size=comm.size)
        y = fc2.forward(h_local, ctx, comm)           # (batch, out), identical on every rank
        gh_local = fc2.backward(gy, ctx)              # (batch, fc2.rows[1] - fc2.rows[0])

    >>> import numpy as np
    >>> RowParallelLinear(np.zeros((16, 2)), rank=2, size=3).rows
    (11, 16)
    """

    def __init__(self, weight: Any, bias: Any = None, *, rank: int, size: int):
        xp, weight, bias = _parameters(type(self).__name__, weight, bias, rank, size, "row")
        self.xp = xp
        self.rank, self.size = int(rank), int(size)
        self.in_features, self.out_features = (int(d) for d in weight.shape)
        self.rows: tuple[int, int] = split_bounds(self.in_features, self.size)[self.rank]
        lo, hi = self.rows
        self.weight = weight[lo:hi, :].copy()
        self.bias = None if bias is None else bias.copy()
        self.grad_weight = xp.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else xp.zeros_like(self.bias)
        self._key = f"tp.RowParallelLinear.{next(_layer_ids)}.x"

    def __repr__(self) -> str:
        lo, hi = self.rows
        return (f"<RowParallelLinear {self.in_features}->{self.out_features}, rank {self.rank} "
                f"of {self.size}: rows {lo}:{hi}>")

    def forward(self, x_local: Any, ctx: dict, comm: Any) -> Any:
        """The FULL output ``x @ W + b`` ``(..., out)``, the same on every rank: this rank's
        partial product ``x_local @ W[rows]`` summed over the ranks with one ``comm.allreduce``
        (in place; none with ``size == 1``, where ``comm`` may be None), then the bias.
        ``x_local`` is this rank's block of the input columns, ``(..., hi - lo)``. Saves it in
        ``ctx`` for :meth:`backward`.

        >>> y = fc2.forward(h_local, ctx, comm)       # doctest: +SKIP
        """
        _comm(self, comm, "forward")
        lo, hi = self.rows
        x_local = _input(self, x_local, hi - lo,
                         f"this rank's block of the input, columns {lo}:{hi} of {self.in_features} "
                         f"(the output of a ColumnParallelLinear with the same rank and size)")
        _ctx(self, ctx, "forward")
        y = x_local @ self.weight
        if self.size > 1:
            y = _allreduce(y, comm, self.xp)
        if self.bias is not None:
            y += self.bias
        ctx[self._key] = x_local
        return y

    def backward(self, grad_y: Any, ctx: dict) -> Any:
        """The gradient of this rank's block of the input, ``(..., hi - lo)``, from the FULL
        output gradient ``grad_y`` (the same on every rank); no communication. Adds this
        micro-batch's gradients to ``grad_weight`` and ``grad_bias``, and takes the saved input
        out of ``ctx``.

        >>> import numpy as np
        >>> fc, ctx = RowParallelLinear(np.full((2, 1), 2.0), rank=0, size=1), {}
        >>> fc.forward(np.array([[1.0, 3.0]]), ctx, None)
        array([[8.]])
        >>> fc.backward(np.array([[1.0]]), ctx), fc.grad_weight.ravel()
        (array([[2., 2.]]), array([1., 3.]))
        """
        x = _saved(self, ctx)
        g = _grad(self, grad_y, x, self.out_features, "the full output")
        _accumulate(self, x, g)
        del ctx[self._key]
        return g @ self.weight.T

def gather_columns(y_local: Any, comm: Any) -> Any:
    """The whole output of a :class:`ColumnParallelLinear`: every rank's block, joined in rank
    order along the last axis (one ``comm.allgather``), for when the full activation is needed
    (a loss over all outputs, a check). Every rank gets the same array.

    >>> y = gather_columns(fc1.forward(x, ctx), comm)   # doctest: +SKIP
    """
    if comm is None or not hasattr(comm, "allgather"):
        raise UsageError(f"gather_columns needs the cell's comm as its second argument, not "
                         f"{type(comm).__name__}: call gather_columns(y_local, comm).")
    if getattr(y_local, "ndim", 0) < 1:
        raise UsageError(f"gather_columns takes this rank's block of columns, an array of at least "
                         f"one dimension, not {type(y_local).__name__} {getattr(y_local, 'shape', '')}.")
    xp = _module(y_local)
    parts = comm.allgather(y_local)
    return xp.concatenate([xp.asarray(p) for p in parts], axis=-1)


def sgd(params: Sequence[Any], grads: Sequence[Any], lr: float) -> None:
    """One step of plain gradient descent, in place: ``p -= lr * g`` for each pair, then each
    ``g[...] = 0``. Pass the layers' :meth:`~ColumnParallelLinear.parameters` and
    :meth:`~ColumnParallelLinear.gradients` (each rank updates its own blocks; a replicated
    bias gets the same update on every rank).

    >>> import numpy as np
    >>> p, g = np.ones(2), np.array([1.0, 2.0])
    >>> sgd([p], [g], lr=0.5)
    >>> p, g
    (array([0.5, 0. ]), array([0., 0.]))
    """
    params, grads = list(params), list(grads)
    if len(params) != len(grads):
        raise UsageError(f"sgd: {len(params)} parameters but {len(grads)} gradients; pass "
                         f"layer.parameters() and layer.gradients() of the same layers, in the same order.")
    for i, (p, g) in enumerate(zip(params, grads)):
        if tuple(p.shape) != tuple(g.shape):
            raise UsageError(f"sgd: parameter {i} has shape {tuple(p.shape)} but its gradient "
                             f"{tuple(g.shape)}; pass parameters() and gradients() in the same order.")
    for p, g in zip(params, grads):
        p -= lr * g
        g[...] = 0


# -- checks and helpers --------------------------------------------------------------------------
def _whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _module(array: Any) -> Any:
    """NumPy, or CuPy for a CuPy array (already loaded, since the array exists)."""
    if type(array).__module__.startswith("cupy"):
        return sys.modules["cupy"]
    return np


def _kind(xp: Any) -> str:
    return "NumPy (host)" if xp is np else "CuPy (GPU)"


def _parameters(layer: str, weight: Any, bias: Any, rank: Any, size: Any,
                split: str) -> tuple[Any, Any, Any]:
    """The array module, the weight and the bias of a layer being built, each checked."""
    if not _whole(size) or size < 1:
        raise UsageError(f"{layer}: size={size!r} must be the number of ranks, a whole number 1 or "
                         f"more: pass size=comm.size.")
    if not _whole(rank) or not 0 <= rank < size:
        raise UsageError(f"{layer}: rank={rank!r} is not a rank of {size}: it must be 0 to {size - 1}. "
                         f"Pass rank=comm.rank, size=comm.size.")
    xp = _module(weight)
    if xp is np:
        weight = np.asarray(weight)
    if weight.ndim != 2:
        raise UsageError(f"{layer}: the weight must be 2-D, the FULL (in, out) matrix of y = x @ W, "
                         f"but it has shape {tuple(weight.shape)}. Pass the whole layer's weight; "
                         f"each rank keeps its own block.")
    n_in, n_out = (int(d) for d in weight.shape)
    if split == "column" and size > n_out:
        raise UsageError(f"{layer}: the weight has {n_out} output column(s) to split over size={size} "
                         f"ranks, so some rank would get 0 columns. Use at most {n_out} ranks, or a "
                         f"wider layer.")
    if split == "row" and size > n_in:
        raise UsageError(f"{layer}: the weight has {n_in} input row(s) to split over size={size} "
                         f"ranks, so some rank would get 0 rows. Use at most {n_in} ranks, or a "
                         f"wider layer.")
    if bias is not None:
        bias = xp.asarray(bias)
        if bias.ndim != 1 or bias.shape[0] != n_out:
            raise UsageError(f"{layer}: the bias must have shape ({n_out},), one value per output of "
                             f"the FULL (in, out) = {(n_in, n_out)} weight, but it has shape "
                             f"{tuple(bias.shape)}. Pass the whole layer's bias (or None).")
    return xp, weight, bias


def _comm(layer: Any, comm: Any, call: str) -> None:
    name = type(layer).__name__
    if comm is None:
        if layer.size == 1:
            return
        raise UsageError(f"{name}.{call} needs the cell's comm: the layer is split over "
                         f"{layer.size} ranks, whose partial results must be summed. Pass comm.")
    size, rank = getattr(comm, "size", None), getattr(comm, "rank", None)
    if size is None or rank is None:
        raise UsageError(f"{name}.{call}: the comm argument is a {type(comm).__name__}, which has no "
                         f".size and .rank; pass the cell's comm (or None when size is 1).")
    if size != layer.size:
        raise UsageError(f"{name}.{call}: the layer was built for size={layer.size} ranks, but this "
                         f"comm has {size}. Build it with rank=comm.rank, size=comm.size of the "
                         f"comm you pass here.")
    if rank != layer.rank:
        raise UsageError(f"{name}.{call}: the layer was built for rank {layer.rank}, but this comm's "
                         f"rank is {rank}. Build it with rank=comm.rank, size=comm.size.")


def _input(layer: Any, x: Any, expected: int, what: str) -> Any:
    name = type(layer).__name__
    xp = _module(x)
    if xp is np:
        x = np.asarray(x)
    if xp is not layer.xp:
        raise UsageError(f"{name}.forward: the input is a {_kind(xp)} array but the layer's weight is "
                         f"{_kind(layer.xp)}; move one to the other (xp.asarray(x) in a cell).")
    if x.ndim < 1 or x.shape[-1] != expected:
        raise UsageError(f"{name}.forward: the input's last dimension must be {expected}, {what}, but "
                         f"the input has shape {tuple(x.shape)}.")
    return x


def _ctx(layer: Any, ctx: Any, call: str) -> None:
    if not isinstance(ctx, dict):
        raise UsageError(f"{type(layer).__name__}.{call}: ctx must be a dict (one per micro-batch, "
                         f"e.g. ctx = {{}}), not {type(ctx).__name__}.")


def _saved(layer: Any, ctx: Any) -> Any:
    _ctx(layer, ctx, "backward")
    if layer._key not in ctx:
        raise UsageError(f"{type(layer).__name__}.backward: ctx holds no input saved by this layer's "
                         f"forward: backward was called before forward for this micro-batch (or "
                         f"twice, or with another micro-batch's ctx). Call forward(..., ctx) first "
                         f"with the same ctx.")
    return ctx[layer._key]


def _grad(layer: Any, grad: Any, x: Any, width: int, what: str) -> Any:
    xp = _module(grad)
    if xp is np:
        grad = np.asarray(grad)
    if xp is not layer.xp:
        raise UsageError(f"{type(layer).__name__}.backward: the gradient is a {_kind(xp)} array but "
                         f"the layer's weight is {_kind(layer.xp)}; move one to the other.")
    expected = tuple(x.shape[:-1]) + (width,)
    if tuple(grad.shape) != expected:
        raise UsageError(f"{type(layer).__name__}.backward: the gradient must have shape {expected} "
                         f"(the saved input's leading dimensions, then {width}: {what}), but it has "
                         f"shape {tuple(grad.shape)}.")
    return grad


def _accumulate(layer: Any, x: Any, g: Any) -> None:
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    layer.grad_weight += x2.T @ g2
    if layer.grad_bias is not None:
        layer.grad_bias += g2.sum(axis=0)


def _allreduce(array: Any, comm: Any, xp: Any) -> Any:
    """``array`` summed over the ranks, in place (a matmul's result is contiguous already, so
    the copy is rare; a CuPy array goes through the host)."""
    array = xp.ascontiguousarray(array)
    comm.allreduce(array, out=array)
    return array
