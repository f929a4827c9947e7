"""The examples in the pure modules' docstrings run, and print what they say (no cluster)."""

from __future__ import annotations

import doctest
import importlib

import pytest

#: The pure layer (and the pure planning half of gpu.py), plus the dashboard, whose example renders
#: text without a kernel. Each has examples; a module listed here without any fails, so an example
#: cannot vanish unnoticed.
MODULES = [
    "nbparallel.format",
    "nbparallel.dataplane.transport",
    "nbparallel.dataplane.parcel",
    "nbparallel.errors",
    "nbparallel.partition",
    "nbparallel.gpu",
    "nbparallel.pipeline.schedule",
    "nbparallel.pipeline.layout",
    "nbparallel.precision",
    "nbparallel.tp",
    "nbparallel.telemetry.records",
    "nbparallel.telemetry.reduce",
    "nbparallel.telemetry.trace",
    "nbparallel.telemetry.history",
    "nbparallel.widgets.charts",
    "nbparallel.widgets.placement",
    "nbparallel.widgets.dashboard",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (above)"
