"""Pipeline (model) parallelism: stages on engines, micro-batches flowing between them.

The Python twins of ``%%stage`` and ``%pipeline``, as :mod:`nbparallel.pipeline.runtime` shows::

    from nbparallel import pipeline
    pipeline.stage("l1", STAGE_CELL_SOURCE)
    y = pipeline.run(x, microbatches=8)

:mod:`nbparallel.pipeline.schedule` is the pure part (schedules as plain data, validation, simulation,
bubble math); it imports neither ipyparallel nor NumPy, so it can be used and tested without a cluster.
The runtime and its twins (:mod:`~nbparallel.pipeline.twins`) are loaded on first use (a module ``__getattr__``),
so importing the package or its schedules stays pure.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Layout", "Pipeline", "RunResult", "StageInfo", "clear", "grid", "run", "where", "show", "stage",
           "train"]

_RUNTIME = frozenset({"Pipeline", "RunResult", "StageInfo"})
_LAYOUT = frozenset({"Layout"})
_TWINS = frozenset(__all__) - _RUNTIME - _LAYOUT


def __getattr__(name: str) -> Any:
    if name in _RUNTIME:
        return getattr(importlib.import_module(".runtime", __name__), name)
    if name in _LAYOUT:
        return getattr(importlib.import_module(".layout", __name__), name)
    if name in _TWINS:
        return getattr(importlib.import_module(".twins", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _RUNTIME | _LAYOUT | _TWINS)
