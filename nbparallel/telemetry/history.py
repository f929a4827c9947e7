"""The last few minutes of telemetry in one-second bins: what the dashboard's charts draw.

Pure and bounded: per engine, busy seconds and the CPU and GPU samples of each bin; bytes of
each flow per bin; only the last ``span`` seconds are kept, so a run of any length holds at most
``span / step`` bins per series. :class:`~nbparallel.telemetry.reduce.Telemetry` feeds it as it
ingests records::

    >>> h = History(step=1.0, span=5.0)
    >>> h.add_span(0, "scatter", 100.2, 100.7)
    >>> h.add_sample(0, 100.5, cpu=90.0)
    >>> h.add_bytes("out", 100.4, 2_000)
    >>> h.busy(0, now=101.0)          # the bins of 96..100 s; 101 is still filling
    [0.0, 0.0, 0.0, 0.0, 0.5]
    >>> h.cpu(0, now=101.0)[-1]
    90.0
    >>> h.rates(now=101.0)["out"][-1]
    2000.0
"""

from __future__ import annotations

import math

__all__ = ["History", "RATE_FLOWS"]

#: The kinds of bytes the rate chart shows: notebook to engines, engines to notebook, pipeline
#: activations and gradients between engines, and ``comm`` collectives between engines.
RATE_FLOWS = ("out", "in", "stage", "comm")

#: Span kinds drawn inside another span of the same engine (a collective within its cell):
#: counting them too would count the same second twice.
NESTED = ("comm",)


class History:
    """Per-engine busy share, CPU and GPU use, and bytes per second by flow, binned."""

    def __init__(self, step: float = 1.0, span: float = 300.0):
        self.step, self.span = step, span
        self.bins = max(1, round(span / step))
        self._busy: dict[int, dict[int, float]] = {}
        self._cpu: dict[int, dict[int, tuple[float, int]]] = {}
        self._gpu: dict[int, dict[int, tuple[float, int]]] = {}
        self._bytes: dict[str, dict[int, float]] = {f: {} for f in RATE_FLOWS}
        self._newest = -math.inf
        self._pruned = -math.inf
        self._first = math.inf  # the oldest record seen

    # -- input -------------------------------------------------------------------------------
    def add_span(self, engine: int, kind: str, start: float, end: float) -> None:
        """An engine worked from ``start`` to ``end``: its seconds go to the bins they cover."""
        if kind in NESTED or end <= start:
            return
        bins = self._busy.setdefault(engine, {})
        k = math.floor(start / self.step)
        while k * self.step < end:
            lo, hi = max(start, k * self.step), min(end, (k + 1) * self.step)
            if hi > lo:
                bins[k] = bins.get(k, 0.0) + hi - lo
            k += 1
            if k - math.floor(start / self.step) > self.bins:  # a span longer than the window
                break
        self._saw(end)

    def add_sample(self, engine: int, time: float, cpu: float,
                   gpu: float | None = None) -> None:
        """A load sample: CPU percent of the engine's process (and GPU utilisation)."""
        k = math.floor(time / self.step)
        for store, value in ((self._cpu, cpu), (self._gpu, gpu)):
            if value is None:
                continue
            bins = store.setdefault(engine, {})
            total, n = bins.get(k, (0.0, 0))
            bins[k] = (total + value, n + 1)
        self._saw(time)

    def add_bytes(self, flow: str, time: float, nbytes: int) -> None:
        bins = self._bytes[flow]
        k = math.floor(time / self.step)
        bins[k] = bins.get(k, 0.0) + nbytes
        self._saw(time)

    def _saw(self, time: float) -> None:
        if time < self._first:
            self._first = time
        if time > self._newest:
            self._newest = time
            if time - self._pruned > self.span / 4:  # a few times a window, not every record
                self.prune(time)
                self._pruned = time

    def prune(self, now: float) -> None:
        """Forget bins older than the window before ``now``."""
        cut = math.floor(now / self.step) - self.bins
        stores = [*self._busy.values(), *self._cpu.values(), *self._gpu.values(),
                  *self._bytes.values()]
        for bins in stores:
            for k in [k for k in bins if k <= cut]:
                del bins[k]

    # -- readers -----------------------------------------------------------------------------
    def shown(self, now: float, least: float = 30.0) -> int:
        """How many bins a chart ending at ``now`` needs: back to the first record, at least
        ``least`` seconds' worth, at most the whole window (so a 10 s cell is not a sliver at
        the edge of five minutes)."""
        if self._first == math.inf:
            return max(1, round(least / self.step))
        need = math.ceil((now - self._first) / self.step) + 1
        return max(round(least / self.step), min(self.bins, need))

    def _keys(self, now: float, bins: int | None) -> range:
        last = math.floor(now / self.step) - 1  # the bin in progress is not drawn yet
        return range(last - (bins or self.bins) + 1, last + 1)

    def busy(self, engine: int, now: float, bins: int | None = None) -> list[float]:
        """Share of each bin of the ``bins`` (default: the whole window) ending at ``now`` that
        ``engine`` worked, oldest first."""
        got = self._busy.get(engine, {})
        return [min(1.0, got.get(k, 0.0) / self.step) for k in self._keys(now, bins)]

    def cpu(self, engine: int, now: float, bins: int | None = None) -> list[float | None]:
        """Mean CPU percent of each bin (None where no sample came)."""
        return _means(self._cpu.get(engine, {}), self._keys(now, bins))

    def gpu(self, engine: int, now: float, bins: int | None = None) -> list[float | None]:
        """Mean GPU utilisation of each bin (None where the engine has no GPU or no sample)."""
        return _means(self._gpu.get(engine, {}), self._keys(now, bins))

    def rates(self, now: float, bins: int | None = None) -> dict[str, list[float]]:
        """Bytes per second of each flow in each bin."""
        return {f: [self._bytes[f].get(k, 0.0) / self.step for k in self._keys(now, bins)]
                for f in RATE_FLOWS}

    def has_gpu(self) -> bool:
        return any(self._gpu.values())


def _means(bins: dict[int, tuple[float, int]], keys: range) -> list[float | None]:
    out: list[float | None] = []
    for k in keys:
        total, n = bins.get(k, (0.0, 0))
        out.append(total / n if n else None)
    return out
