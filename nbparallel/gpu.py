"""GPUs: which engine uses which device, the array module a cell sees, and device metrics.

The one place CuPy and NVML are imported, both lazily, so CPU-only machines never pay for them:
importing nbparallel, or running a magic on engines bound to no GPU, imports neither and never
initialises CUDA.

Three parts:

* **Planning** (pure, runs in the notebook): :func:`parse_gpus` reads ``--gpus all|none|0,1``;
  :func:`local_ranks` numbers the engines of each host; :func:`assign` gives local rank ``r`` the
  device ``devices[r % len(devices)]``; :func:`plan` puts them together and checks the request.
* **Binding** (runs in an engine): :func:`visible` lists the CUDA devices the engine sees,
  :func:`bind` makes one of them current with ``cupy.cuda.Device(k).use()`` (or records that the
  engine stays on the CPU), and :func:`array_module` answers the ``xp`` of its cells.
* **Metrics** (runs in the notebook): :class:`Nvml` reads a device's name, memory and
  utilisation through NVML (``pynvml``, from the ``nvidia-ml-py`` package), finding the device
  by UUID (or PCI bus id), never by index: CUDA numbers devices fastest first and after
  ``CUDA_VISIBLE_DEVICES``, NVML in PCI order, so the same index may name two different GPUs.

Why ``Device(k).use()`` rather than ``CUDA_VISIBLE_DEVICES``: the variable is read once, when
CUDA initialises, and ipyparallel launches every engine of a set with the same environment. An
engine of a cluster we connect to is already running and may have initialised CUDA, so only a
call in the engine can bind it. The bound device is made current again by every
:func:`array_module` call, i.e. at the start of each cell, in whatever thread runs it (CuPy's
current device is per thread).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Sequence

import numpy as np

from .errors import UsageError
from .format import nbytes, parse_ranges

__all__ = ["array_module", "cupy_if_device", "device_name", "to_host", "to_device", "parse_gpus",
           "assign", "local_ranks", "plan", "visible", "bind", "bound", "uuid_string", "Nvml"]


# -- planning (pure) -----------------------------------------------------------------------------
def parse_gpus(spec: str | Sequence[int] | None) -> str | tuple[int, ...] | None:
    """``None`` (automatic), ``"all"``, ``"none"`` or a tuple of CUDA device numbers.

    >>> parse_gpus("all"), parse_gpus("none"), parse_gpus("0,2-3"), parse_gpus([1])
    ('all', 'none', (0, 2, 3), (1,))
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        devices = tuple(spec)
        if not devices or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                  for d in devices):
            raise UsageError(f"gpus={spec!r}: give 'all', 'none' or CUDA device numbers like [0, 1].")
        return tuple(dict.fromkeys(devices))
    text = spec.strip().lower()
    if text in ("all", "none"):
        return text
    if text == "cpu":
        return "none"
    return tuple(parse_ranges(spec, "--gpus", item="a CUDA device number", hint=_GPUS_HINT))


_GPUS_HINT = ("Write all, none, or CUDA device numbers such as 0,1 or 0-3 (as `nvidia-smi -L` lists "
              "them when CUDA_VISIBLE_DEVICES is unset).")


def assign(local_ranks: Sequence[int], devices: Sequence[int]) -> list[int | None]:
    """The device of each local rank, round-robin: rank ``r`` gets ``devices[r % len(devices)]``.

    No devices means no GPU for anyone (``None``).

    >>> assign([0, 1, 2], [0, 1])
    [0, 1, 0]
    >>> assign([0, 1], [])
    [None, None]
    """
    if not devices:
        return [None] * len(local_ranks)
    return [devices[r % len(devices)] for r in local_ranks]


def local_ranks(hosts: Sequence[str]) -> list[int]:
    """Each entry's index among the entries with the same host, in the given order.

    >>> local_ranks(["a", "b", "a", "a", "b"])
    [0, 0, 1, 2, 1]
    """
    seen: dict[str, int] = {}
    out = []
    for host in hosts:
        out.append(seen.get(host, 0))
        seen[host] = out[-1] + 1
    return out


def plan(spec: str | tuple[int, ...] | None, engines: Sequence[tuple[int, str, Sequence[int]]]
         ) -> tuple[dict[int, int | None], str | None]:
    """The device of each engine, and a one-line note when a request gave no GPU to anyone.

    ``engines`` lists ``(engine id, host, CUDA device numbers it sees)`` for every engine of the
    pool, so local ranks count the engines already bound. ``spec`` is what :func:`parse_gpus`
    returns: ``None`` uses every visible device when there are any, silently, like ``"all"``;
    ``"all"`` with no device anywhere binds nothing and says so; device numbers that an engine
    does not see are a :class:`UsageError`.
    """
    ordered = sorted(engines)
    ranks = local_ranks([host for _, host, _ in ordered])
    if spec == "none":
        return {eid: None for eid, _, _ in ordered}, None
    choice: dict[int, int | None] = {}
    for (eid, host, seen), rank in zip(ordered, ranks):
        if spec is None or spec == "all":
            devices: Sequence[int] = sorted(seen)
        else:
            lacking = [d for d in spec if d not in seen]
            if lacking:
                sees = (f"sees CUDA device{'s' if len(seen) != 1 else ''} "
                        f"{','.join(map(str, sorted(seen)))}" if seen else
                        "sees no CUDA device (CuPy is not installed there, or finds no GPU)")
                raise UsageError(
                    f"--gpus {','.join(map(str, spec))}: engine {eid} on {host} {sees}, so it "
                    f"cannot use device{'s' if len(lacking) > 1 else ''} "
                    f"{','.join(map(str, lacking))}. Use --gpus all, a subset of what it sees, "
                    f"or --gpus none."
                )
            devices = spec
        choice[eid] = assign([rank], devices)[0]
    note = None
    if spec == "all" and ordered and all(k is None for k in choice.values()):
        note = ("nbparallel: --gpus all: no engine sees a CUDA device (CuPy is not installed, or "
                "finds no GPU), so none is bound; cells run on the CPU with xp = NumPy.")
    return choice, note


# -- binding (in an engine) ----------------------------------------------------------------------
_UNBOUND = "unbound"
#: This engine's binding: _UNBOUND (never asked; CuPy's default device if CuPy sees one), None
#: (the CPU), or the description of its device. Engine-process state, like ``engine/store.py``.
_binding: Any = _UNBOUND


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


def cupy_if_device() -> Any | None:
    """CuPy, when it is installed and sees a CUDA device; None otherwise (imports CuPy if there)."""
    return _cupy()


def uuid_string(raw: Any) -> str | None:
    """NVML's spelling (``GPU-8-4-4-4-12`` hex digits) of the UUID in CUDA's device properties.

    CuPy returns the 16 raw bytes; a value cut short (at a zero byte) or all zeros identifies
    nothing, so it gives ``None`` and the PCI bus id is used instead.

    >>> uuid_string(bytes(range(1, 17)))
    'GPU-01020304-0506-0708-090a-0b0c0d0e0f10'
    >>> uuid_string(b"\\x01\\x02") is None
    True
    """
    if isinstance(raw, str):
        return raw if raw.startswith(("GPU-", "MIG-")) else None
    if not isinstance(raw, (bytes, bytearray)) or len(raw) < 16 or not any(raw[:16]):
        return None
    h = bytes(raw[:16]).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _describe(cp: Any, index: int) -> dict[str, Any]:
    props = cp.cuda.runtime.getDeviceProperties(index)
    name = props.get("name", b"?")
    try:
        pci = cp.cuda.runtime.deviceGetPCIBusId(index)
    except Exception:
        pci = None
    return {"index": index, "uuid": uuid_string(props.get("uuid")), "pci": pci,
            "name": name.decode(errors="replace") if isinstance(name, bytes) else str(name),
            "total": int(props.get("totalGlobalMem", 0)) or None}


def visible() -> list[dict[str, Any]]:
    """The CUDA devices this process sees: index, uuid, PCI bus id, name, total memory.

    Imports CuPy if it is installed (no context is created); ``[]`` without CuPy or a device.
    """
    cp = _cupy()
    if cp is None:
        return []
    return [_describe(cp, k) for k in range(cp.cuda.runtime.getDeviceCount())]


def bind(index: int | None) -> dict[str, Any] | None:
    """Bind this engine to CUDA device ``index``, or to the CPU with ``None``.

    ``None`` never imports CuPy. A device makes CuPy the engine's ``xp`` and the device current
    (``cupy.cuda.Device(index).use()``); its description is returned.
    """
    global _binding
    if index is None:
        _binding = None
        return None
    cp = _cupy()
    if cp is None or not 0 <= index < cp.cuda.runtime.getDeviceCount():
        raise RuntimeError(f"this engine sees no CUDA device {index}")
    cp.cuda.Device(index).use()
    _binding = _describe(cp, index)
    return dict(_binding)


def bound() -> dict[str, Any] | None:
    """The description of this engine's device, or None (CPU, or never bound)."""
    return dict(_binding) if isinstance(_binding, dict) else None


def array_module() -> Any:
    """The ``xp`` of a cell: CuPy on an engine bound to a GPU, else NumPy.

    On a bound engine the device is made current again for the calling thread. An engine that was
    never bound keeps the old behaviour: CuPy when it sees a device.
    """
    if _binding is None:
        return np
    if isinstance(_binding, dict):
        cp = _cupy()
        cp.cuda.Device(_binding["index"]).use()
        return cp
    return _cupy() or np


def device_name() -> str:
    """``"cpu"`` or the CUDA device this process uses, e.g. ``"cuda:0 NVIDIA H200"``."""
    if _binding is None:
        return "cpu"
    if isinstance(_binding, dict):
        return f"cuda:{_binding['index']} {_binding['name']}"
    cp = _cupy()
    if cp is None:
        return "cpu"
    dev = cp.cuda.Device()
    return f"cuda:{dev.id} {_describe(cp, dev.id)['name']}"


def to_host(value: Any) -> Any:
    """NumPy copy of a CuPy array, also inside lists, tuples and dicts; anything else unchanged.

    Containers matter: a CuPy array inside a gathered list would otherwise be unpickled in the
    notebook, importing CuPy there, or fail where there is no GPU.
    """
    if type(value).__module__.startswith("cupy"):
        return value.get()
    if type(value) in (list, tuple):
        return type(value)(to_host(v) for v in value)
    if type(value) is dict:
        return {k: to_host(v) for k, v in value.items()}
    return value


def to_device(values: dict[str, Any]) -> dict[str, Any]:
    """On an engine bound to a GPU, the NumPy arrays among ``values`` copied to its device.

    Arrays of Python objects and everything that is not an ndarray stay as they are; on any other
    engine ``values`` comes back unchanged (and CuPy is not imported).
    """
    if not isinstance(_binding, dict):
        return values
    cp = array_module()
    return {k: cp.asarray(v) if isinstance(v, np.ndarray) and not v.dtype.hasobject else v
            for k, v in values.items()}


# -- metrics (in the notebook) -------------------------------------------------------------------
class Nvml:
    """Device name, memory and utilisation through NVML, by UUID or PCI bus id; handles cached.

    Made on first use by a pool that has engines bound to GPUs on this host; without
    ``pynvml`` or a driver every query answers ``None``. Never initialises CUDA.
    """

    def __init__(self) -> None:
        self._lib: Any = None
        self._handles: dict[tuple[str | None, str | None], Any] = {}
        try:
            import pynvml

            pynvml.nvmlInit()
            self._lib = pynvml
        except Exception:  # not installed, no driver, no permission: no metrics
            self._lib = None

    @property
    def ok(self) -> bool:
        return self._lib is not None

    def _handle(self, device: dict[str, Any]) -> Any:
        key = (device.get("uuid"), device.get("pci"))
        if key not in self._handles:
            handle = None
            for how, ident in (("nvmlDeviceGetHandleByUUID", key[0]),
                               ("nvmlDeviceGetHandleByPciBusId", key[1])):
                if handle is None and ident:
                    try:
                        handle = getattr(self._lib, how)(ident.encode())
                    except Exception:
                        handle = None
            self._handles[key] = handle
        return self._handles[key]

    def name(self, device: dict[str, Any]) -> str | None:
        """NVML's name of the device, or None."""
        if self._lib is None or (h := self._handle(device)) is None:
            return None
        try:
            name = self._lib.nvmlDeviceGetName(h)
        except Exception:
            return None
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)

    def metrics(self, device: dict[str, Any]) -> tuple[float | None, int | None, int | None]:
        """``(utilisation %, memory used, memory total)``; None for what NVML cannot tell."""
        if self._lib is None or (h := self._handle(device)) is None:
            return None, None, None
        util = used = total = None
        try:
            util = float(self._lib.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:
            pass  # not supported on every device (MIG slices, some laptops)
        try:
            mem = self._lib.nvmlDeviceGetMemoryInfo(h)
            used, total = int(mem.used), int(mem.total)
        except Exception:
            pass
        return util, used, total

    def close(self) -> None:
        if self._lib is not None:
            try:
                self._lib.nvmlShutdown()
            except Exception:
                pass
            self._lib = None
            self._handles.clear()
