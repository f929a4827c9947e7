"""Engines' output shown while their tasks run: new complete lines, labelled, rate-limited.

Reads only a task's ``stdout`` and ``stderr`` strings (what ipyparallel's ``AsyncResult`` fills
as the engine's output arrives), so it imports nothing of ipyparallel; ``pool.py`` prints a
finished task's remainder through it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Sequence

__all__ = ["Relay"]


class Relay:
    """Engines' output printed while their tasks run, not only when they end.

    ipyparallel fills a task's ``stdout``/``stderr`` as the engine's output messages arrive;
    :meth:`tick` (from the wait loop) prints the complete lines that are new, labelled
    ``[engine K]``, at most :data:`LINES_PER_SECOND` a second: a cell that prints a million lines
    costs the browser a few hundred, and one line says how many were left out.
    """

    LINES_PER_SECOND = 200

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._printed: dict[tuple[int, str], int] = {}  # (id(future), stream) -> chars shown
        self._clock = clock
        self._window = clock()
        self._lines = 0
        self._dropped = 0

    def tick(self, futures: Sequence[Any], engines: Sequence[int]) -> None:
        for fut, engine in zip(futures, engines):
            self.show(fut, engine, final=False)
        self._report()

    def show(self, future: Any, engine: int, final: bool) -> None:
        for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            try:
                text = _text(_stream(future, name))
            except Exception:
                continue
            key = (id(future), name)
            start = self._printed.get(key, 0)
            end = len(text) if final else text.rfind("\n", start) + 1
            if end <= start:
                continue
            self._printed[key] = end
            lines = text[start:end].rstrip("\n").split("\n")
            shown = self._allow(len(lines), final)
            if shown:
                stream.write("".join(f"[engine {engine}] {line}\n" for line in lines[:shown]))
        if final:
            self._report(force=True)

    def _allow(self, n: int, final: bool) -> int:
        now = self._clock()
        if now - self._window >= 1.0:
            self._window, self._lines = now, 0
        room = max(0, self.LINES_PER_SECOND - self._lines)
        shown = min(n, room)
        self._lines += shown
        self._dropped += n - shown
        return shown

    def _report(self, force: bool = False) -> None:
        if self._dropped and (force or self._clock() - self._window >= 1.0):
            sys.stderr.write(f"[nbparallel] {self._dropped} lines of engine output were not "
                             f"shown (more than {self.LINES_PER_SECOND} a second).\n")
            self._dropped = 0


def _stream(future: Any, name: str) -> Any:
    """``future.stdout`` (or ``stderr``), read where ipyparallel keeps it. Its ``AsyncResult``
    answers the attribute through its metadata, first parsing every date there with dateutil
    (about 50 us each: half a millisecond of a trivial cell on two engines); the raw metadata
    holds the same strings."""
    try:  # not getattr: a missing attribute would go to AsyncResult.__getattr__ again
        raw = object.__getattribute__(future, "_metadata")
    except AttributeError:
        raw = None
    if isinstance(raw, list) and raw and all(isinstance(md, dict) for md in raw):
        values = [md.get(name, "") for md in raw]
        return values[0] if len(values) == 1 else values
    return getattr(future, name)


def _text(value: Any) -> str:
    # A task of several messages gives a list of strings, one per message.
    return "".join(value) if isinstance(value, list) else (value or "")
