"""Progress of long work: an ipywidgets bar in a notebook, a text line in a terminal."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

__all__ = ["Progress", "progress"]

_MIN_INTERVAL = 0.1  # redraws per second are capped; a tight loop of tiny items must not flood the UI


class Progress(Protocol):
    def update(self, done: int) -> None: ...

    def close(self, done: int) -> None: ...


class _Silent:
    def update(self, done: int) -> None:
        pass

    def close(self, done: int) -> None:
        pass


class _Text:
    def __init__(self, total: int, label: str, stream: Any):
        self.total, self.label, self.stream = total, label, stream
        self.t0 = self.last = time.perf_counter()

    def _draw(self, done: int, end: str) -> None:
        width = 30
        filled = int(width * done / max(self.total, 1))
        elapsed = time.perf_counter() - self.t0
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{done}/{self.total} {elapsed:.1f}s{end}")
        self.stream.flush()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= _MIN_INTERVAL:
            self.last = now
            self._draw(done, "")

    def close(self, done: int) -> None:
        self._draw(done, "\n")


class _Widget:
    def __init__(self, total: int, label: str):
        import ipywidgets as w
        from IPython.display import display

        self.bar = w.IntProgress(value=0, min=0, max=max(total, 1), description=label)
        self.text = w.Label(f"0/{total}")
        self.total = total
        self.t0 = self.last = time.perf_counter()
        self.box = w.HBox([self.bar, self.text])
        display(self.box)

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= _MIN_INTERVAL:
            self.last = now
            self.bar.value = done
            self.text.value = f"{done}/{self.total} {now - self.t0:.1f}s"

    def close(self, done: int) -> None:
        self.bar.value = done
        self.bar.bar_style = "success" if done == self.total else "warning"
        self.text.value = f"{done}/{self.total} in {time.perf_counter() - self.t0:.1f}s"


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress(total: int, label: str, enabled: bool = True) -> Progress:
    """A bar in a Jupyter kernel, a text line on a terminal, nothing when output is not a terminal."""
    if not enabled or total == 0:
        return _Silent()
    if _in_kernel():
        return _Widget(total, label)
    if sys.stderr.isatty():
        return _Text(total, label, sys.stderr)
    return _Silent()
