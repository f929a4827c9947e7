"""The Transport interface: how a value gets from one process to another, and the one chooser.

A *hop* is one bundle of named values going from a sender to a receiver: the notebook to an
engine (``%%scatter`` shards, ``%%pmap`` chunks), an engine to the notebook (gathered results),
or an engine to an engine (pipeline activations and gradients). Every hop rides in a control
message the cluster sends anyway (ipyparallel's, or the engines' signed direct channel); a
transport decides where the *bytes* go. The built-in ones, one module each under
``dataplane/transports/``:

============  =================================================================================
``ipp``       inside the control message itself; notebook <-> engine only
``shm``       a 0600 shared-memory segment of this host; the message says where to read
``direct``    the signed ZeroMQ channel (``direct.py``) beside the controller; reaches any host
``cuda-ipc``  device memory of a GPU of this host, by CUDA IPC handle (never forced, only chosen)
============  =================================================================================

The contract (:class:`Transport`). The sender's half runs in the notebook (one instance per
:class:`~nbparallel.dataplane.plane.DataPlane`, given the plane as its ``link``) or in an engine
(static methods, with the engine's state in ``dataplane/remote.py``); the receiver's half is
always static, because the receiver learns which transport carried a hop from the hop itself.

``name``, ``rank``
    The transport's one name (what ``--transport`` accepts, what telemetry records) and its place
    in the order ``auto`` tries transports in: the lowest rank that :meth:`~Transport.suits` a
    hop carries it.
``reaches(hop)``, ``suits(hop)``
    Whether it can carry a :class:`Hop` (who sends and receives, whether both ends map this
    host's ``/dev/shm``, whether the value is on a GPU), and whether ``auto`` should pick it
    for one of that many bytes.
``place(engines, parcels, shared) -> notes`` / ``open(note) -> values``
    Notebook to engines: put each engine's values (plus ``shared``, the same for all) where the
    engine can reach them and return one *note* per engine, a frozen dataclass that rides in the
    ipyparallel message; the engine opens the note into its values. No room: raise :class:`Full`,
    and the plane asks the chooser again without this transport (unless the user forced it).
``release(notes)``
    The notebook's call is over: what was leased for those notes may be reused.
``deliver(dest, value)`` / ``fetch(engine, dest, inline)``
    Engine to notebook: the engine puts a result where ``dest`` says (returning what must ride
    in its reply instead, if anything); the notebook then fetches it.
``pack(value, owner) -> (header, frames, nbytes)`` / ``unpack(header, frames)``
    Engine to engine: the sending engine packs a value into a message for the signed channel,
    the receiving engine unpacks it. ``owner`` names the notebook's arena (shared-memory
    segments are named after it) and is None when the engines do not share one host.
``reset()``
    In an engine: drop what this transport keeps there (the notebook disconnected).

Accounting is not a transport's job: the plane records one
:class:`~nbparallel.telemetry.Transfer` per placement, named after the transport that carried
it. **A new transport is one module that subclasses Transport, plus one line in
``dataplane/transports/__init__.py``.**

>>> from nbparallel.dataplane import transports  # the built-in transports, registered
>>> choose(Hop(local=True, nbytes=1 << 20))
'shm'
>>> choose(Hop(local=False, nbytes=1 << 20))
'direct'
>>> choose(Hop(local=True, nbytes=100))
'ipp'
>>> choose(Hop(sender="engine", local=True, nbytes=100))
'direct'
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Collection, Sequence

from ..errors import UsageError

__all__ = ["SHM", "DIRECT", "INLINE", "CUDA_IPC", "NAMES", "OPTIONS", "INLINE_LIMIT",
           "HANDOFF_LIMIT", "Hop", "Full", "NotCarried", "Transport", "register", "registered",
           "get", "check", "choose", "nbytes_of", "wire", "unwire"]

SHM = "shm"
DIRECT = "direct"
INLINE = "ipp"
CUDA_IPC = "cuda-ipc"

#: Every transport's name, as telemetry records them.
NAMES = (SHM, DIRECT, INLINE, CUDA_IPC)
#: What ``--transport`` accepts: ``auto`` (chosen per engine), or one transport forced for all.
OPTIONS = ("auto", SHM, DIRECT, INLINE)

#: Values smaller than this ride in the ipyparallel message: for them a segment or a socket
#: round trip costs more than it saves.
INLINE_LIMIT = 64 << 10
#: Between engines the signed channel's own message is as fast as a segment below this size.
HANDOFF_LIMIT = 256 << 10

NOTEBOOK, ENGINE, ANY_ENGINE = "notebook", "engine", "any engine"


class Full(Exception):
    """A transport has no room for a hop now (shared memory or device slots are all taken)."""


@dataclass(frozen=True)
class Hop:
    """What the chooser knows about one hop.

    ``sender`` and ``receiver`` are ``"notebook"`` or ``"engine"``; the receiver of a
    load-balanced ``%%pmap`` chunk is ``"any engine"`` (not known when the chunk is placed).
    ``local``: both ends map this host's ``/dev/shm`` (probed, not guessed from host names).
    ``device``: the value holds (between engines: may hold) CuPy arrays; ``gpu``: both ends are
    GPU processes of this host.
    """

    sender: str = NOTEBOOK
    receiver: str = ENGINE
    local: bool = True
    nbytes: int = 0
    device: bool = False
    gpu: bool = False

    @property
    def between_engines(self) -> bool:
        return self.sender == ENGINE and self.receiver == ENGINE


class NotCarried(TypeError):
    """A transport was handed a hop in a direction it does not carry (its ``reaches`` says no
    to such hops, so only a caller that skipped the chooser gets this)."""


class Transport(abc.ABC):
    """What a transport implements; see the module docstring for the contract. The directions a
    transport does not carry keep these defaults, which raise :class:`NotCarried`."""

    name: ClassVar[str]
    rank: ClassVar[int]
    #: Whether ``--transport NAME`` may force it for every hop it reaches.
    forceable: ClassVar[bool] = True

    def __init__(self, link: Any):
        self.link = link  # the notebook's DataPlane: arena, channels, engines' addresses

    @staticmethod
    @abc.abstractmethod
    def reaches(hop: Hop) -> bool:
        """Whether it can carry ``hop`` at all (what forcing it needs)."""

    @classmethod
    def suits(cls, hop: Hop) -> bool:
        """Whether ``auto`` should pick it for ``hop`` (reachable, and worth it at this size)."""
        return cls.reaches(hop)

    @classmethod
    def why_not(cls, engine: int) -> str:
        """One paragraph for a user who forced this transport onto an engine it cannot reach."""
        return f"--transport {cls.name} cannot reach engine {engine}; leave the default, auto."

    # -- notebook to engines -----------------------------------------------------------------
    def place(self, engines: Sequence[int], parcels: Sequence[dict[str, Any]],
              shared: dict[str, Any]) -> list[Any]:
        raise NotCarried(f"{self.name} does not carry values from the notebook")

    def release(self, notes: Sequence[Any]) -> None:
        """The call that placed ``notes`` is over."""

    @classmethod
    def open(cls, note: Any) -> dict[str, Any]:
        raise NotCarried(f"{cls.name} does not carry values from the notebook")

    # -- engines to the notebook -------------------------------------------------------------
    @classmethod
    def deliver(cls, dest: Any, value: Any) -> Any:
        raise NotCarried(f"{cls.name} does not carry results to the notebook")

    def fetch(self, engine: int, dest: Any, inline: Any) -> Any:
        raise NotCarried(f"{self.name} does not carry results to the notebook")

    # -- engine to engine ----------------------------------------------------------------------
    @classmethod
    def pack(cls, value: Any, owner: str | None) -> tuple[bytes, list[Any], int]:
        raise NotCarried(f"{cls.name} does not carry values between engines")

    @classmethod
    def unpack(cls, header: bytes, frames: list[Any]) -> Any:
        raise NotCarried(f"{cls.name} does not carry values between engines")

    @staticmethod
    def reset() -> None:
        """Drop this transport's state in an engine."""

    def close(self) -> None:
        """The notebook's plane is closing: free what this instance holds."""


_registry: list[type[Transport]] = []


def register(transport: type[Transport]) -> type[Transport]:
    """Make a transport known to the chooser (by name; registering a name again replaces it)."""
    _registry[:] = sorted([t for t in _registry if t.name != transport.name] + [transport],
                          key=lambda t: t.rank)
    return transport


def registered() -> list[type[Transport]]:
    """The transports, in the order ``auto`` tries them."""
    return list(_registry)


def get(name: str) -> type[Transport]:
    """The registered transport called ``name``."""
    for t in _registry:
        if t.name == name:
            return t
    raise KeyError(f"no transport called {name!r}; registered: {[t.name for t in _registry]}")


def check(name: str | None) -> str:
    """``name`` if it is a ``--transport`` option (None means ``auto``); else a UsageError."""
    name = name or "auto"
    if name not in OPTIONS:
        raise UsageError(f"unknown transport {name!r}; use one of {', '.join(OPTIONS)}.")
    return name


def choose(hop: Hop, forced: str = "auto", without: Collection[str] = (), engine: int = -1) -> str:
    """The transport for ``hop``: the first registered one that reaches it, skipping those in
    ``without`` (they were full). With ``forced``, that one wherever it can go, except that a
    hop below :data:`INLINE_LIMIT` keeps riding in the ipyparallel message where it can; forced
    onto a hop it cannot reach, it is a UsageError naming ``engine``.
    """
    forced = check(forced)
    if forced != "auto":
        if hop.nbytes < INLINE_LIMIT and get(INLINE).reaches(hop):
            return INLINE
        if forced not in without and not get(forced).reaches(hop):
            raise UsageError(get(forced).why_not(engine))
        return forced  # when it is full (in ``without``) the caller says so
    for t in _registry:
        if t.name not in without and t.suits(hop):
            return t.name
    raise LookupError(f"no registered transport reaches {hop}")


def nbytes_of(value: Any) -> int:
    """The bytes of the arrays ``value`` holds, as a hop's size: an array's own, or the sum over a
    tuple, list or dict of fewer than 64 of them (looked into that far only); 0 for anything else.

    >>> import numpy as np
    >>> nbytes_of(np.zeros(4)), nbytes_of((1, np.zeros(2))), nbytes_of({"a": np.zeros(1)}), nbytes_of("x")
    (32, 16, 8, 0)
    """
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, (tuple, list)) and len(value) < 64:
        return sum(nbytes_of(v) for v in value)
    if isinstance(value, dict) and len(value) < 64:
        return sum(nbytes_of(v) for v in value.values())
    return 0


# -- engine to engine: which transport packed a message rides in front of it ----------------------
_SEP = b"\0"


def wire(name: str, header: bytes) -> bytes:
    """The header of an engine-to-engine message: the transport's name, then its own header."""
    return name.encode() + _SEP + bytes(header)


def unwire(header: bytes) -> tuple[type[Transport], bytes]:
    """The transport that packed a message, and its own header (after the signature was checked)."""
    name, sep, inner = bytes(header).partition(_SEP)
    if not sep:
        raise ValueError("not an nbparallel engine-to-engine message")
    return get(name.decode()), inner
