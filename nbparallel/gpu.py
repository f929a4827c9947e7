"""The one place CuPy is imported, lazily, so CPU-only machines never pay for it.

Importing nbparallel never initialises CUDA. On an engine, :func:`array_module` answers CuPy when
CuPy is installed and sees a device, NumPy otherwise; cells use it as ``xp``.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import numpy as np

__all__ = ["array_module", "device_name", "to_host"]


@functools.cache
def _cupy() -> Any | None:
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # no driver, no device, broken install: all mean "use NumPy"
        return None


def array_module() -> Any:
    """CuPy on an engine with a usable GPU, else NumPy."""
    return _cupy() or np


def device_name() -> str:
    """``"cpu"`` or the CUDA device this process uses, e.g. ``"cuda:0 NVIDIA H200"``."""
    cp = _cupy()
    if cp is None:
        return "cpu"
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"]
    return f"cuda:{dev.id} {name.decode() if isinstance(name, bytes) else name}"


def to_host(value: Any) -> Any:
    """NumPy copy of a CuPy array; anything else unchanged."""
    if type(value).__module__.startswith("cupy"):
        return value.get()
    return value
