"""Shared-memory segments and the notebook's arena of warm ones.

A segment is a file in ``/dev/shm`` created with mode 0600 under an unguessable name
(``nbp-<kernel pid>-<pool tag>-<128 random bits>``), mapped ``MAP_SHARED`` by the notebook and by every local
engine that reads or writes it.

Why an arena: the first write to a fresh tmpfs page costs a page fault and a zeroing, which held a
256 MB copy to about 1.4 GB/s on our 2-core machine, against 12 GB/s for the same copy into pages
already mapped. So segments are kept and reused, and a segment is reused only when nothing can
still see it:

- the notebook lent it to the user (a gathered array lives in it) and that array is still alive;
- an engine still holds a view of it (a kept shard, a value the cell stashed away), which each
  engine reports with every reply.

Both are detected the same way: every array handed out over a segment is built on a small uint8
"token" array, and a weak reference to the token tells whether any view of it survives.
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import format as fmt

__all__ = ["SHM_DIR", "Segment", "Arena", "NoRoom", "available", "new_name", "align", "default_budget",
           "free_bytes", "parse_size", "total_bytes"]

SHM_DIR = Path("/dev/shm")
PREFIX = "nbp-"
ALIGN = 64  # cache-line alignment keeps every array in a segment aligned for SIMD copies
GRAIN = 1 << 20  # sizes round up to whole MiB so that segments of similar calls can be reused
MARGIN = 8 << 20  # never fill /dev/shm to the last byte: other programs use it too


class NoRoom(Exception):
    """Shared memory cannot take this payload now (budget, free space, or no /dev/shm at all)."""


def new_name(owner: int | str | None = None) -> str:
    """An unguessable segment name, ``nbp-<owner>-<128 random bits>``.

    ``owner`` starts with the kernel's pid, so a watchdog can clean up after a killed kernel
    (``nbp-<pid>-*``); an arena adds its own tag (``<pid>-<tag>``) so that one pool stopping
    removes its own segments and never those of another pool in the same kernel.
    """
    return f"{PREFIX}{owner or os.getpid()}-{secrets.token_hex(16)}"


def available() -> bool:
    """Whether this machine has a writable ``/dev/shm``."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def total_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_blocks * st.f_frsize


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Segment:
    """One shared-memory file, mapped read-write into this process."""

    def __init__(self, name: str, size: int, mm: mmap.mmap):
        self.name = name
        self.size = size
        self.mm = mm

    @classmethod
    def create(cls, size: int, owner: int | str | None = None) -> "Segment":
        """A new private segment of ``size`` bytes whose pages are reserved now: a full
        /dev/shm is :class:`NoRoom` here, never a SIGBUS when the pages are first written
        (``ftruncate`` alone reserves nothing on tmpfs)."""
        name = new_name(owner)
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise NoRoom(f"/dev/shm cannot hold {fmt.nbytes(size)} more: {exc.strerror}") from None
            # Populated up front: engines often write pages first, and a page another process
            # faulted in still costs this process a fault on its first touch.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, size, mm)

    @classmethod
    def attach(cls, name: str, size: int, private: bool = False) -> "Segment":
        """Map an existing segment; refuses one that is not ours alone (owner, mode 0600).

        ``private`` maps it copy-on-write: writes stay in this process (an engine's shard of an
        array the notebook scattered without a copy)."""
        if not name.startswith(PREFIX) or "/" in name:
            raise ValueError(f"{name!r} is not an nbparallel segment name")
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise PermissionError(f"segment {name} is not private to this user (mode 0600)")
            mm = mmap.mmap(fd, size, mmap.MAP_PRIVATE if private else mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(name, size, mm)

    def address(self) -> int:
        """Where the mapping starts in this process, to tell which arrays point into it."""
        return np.frombuffer(self.mm, np.uint8, 1).ctypes.data

    def token(self, offset: int, nbytes: int) -> np.ndarray:
        """A uint8 array over ``[offset, offset + nbytes)``: the base of every view handed out."""
        return np.frombuffer(self.mm, np.uint8, nbytes, offset)

    def unlink(self) -> None:
        try:
            os.unlink(SHM_DIR / self.name)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap if no view is left; otherwise the mapping goes when the last view does."""
        try:
            self.mm.close()
        except BufferError:
            pass


@dataclass
class _Entry:
    segment: Segment
    state: str = "free"  # free | leased | lent
    lent: list[weakref.ref] = field(default_factory=list)
    held_by: set[int] = field(default_factory=set)
    last_used: float = 0.0


class Arena:
    """The notebook's segments: lease one for a transfer, release or lend it after.

    ``budget`` bounds the bytes of all segments together (default: half of /dev/shm, or the
    ``NBPARALLEL_SHM_BUDGET`` environment variable, in bytes or with a K/M/G suffix).
    """

    def __init__(self, budget: int | None = None, keep_free: int = 1 << 30):
        self.owner_pid = os.getpid()
        #: What every segment of this arena (and the engines' hand-off segments for its pool) is
        #: named after: ``<kernel pid>-<tag>``, unique to this arena.
        self.owner = f"{self.owner_pid}-{secrets.token_hex(4)}"
        self.ok = available()
        self.budget = budget if budget is not None else default_budget()
        self.keep_free = keep_free
        self._entries: dict[str, _Entry] = {}
        self._forgotten: list[str] = []

    # -- leases --------------------------------------------------------------------------------
    def lease(self, nbytes: int) -> Segment:
        """A segment of at least ``nbytes`` nobody else uses; :class:`NoRoom` if none can be had."""
        if not self.ok:
            raise NoRoom("this machine has no writable /dev/shm")
        size = max(GRAIN, -(-nbytes // GRAIN) * GRAIN)
        self._reclaim()
        best = None
        for entry in self._entries.values():
            if entry.state == "free" and not entry.held_by and size <= entry.segment.size <= 2 * size:
                if best is None or entry.segment.size < best.segment.size:
                    best = entry
        if best is None:
            self._make_room(size)
            best = _Entry(Segment.create(size, self.owner))
            self._entries[best.segment.name] = best
        best.state = "leased"
        best.last_used = time.monotonic()
        return best.segment

    def release(self, segment: Segment) -> None:
        entry = self._entries.get(segment.name)
        if entry is not None and entry.state == "leased":
            entry.state = "free"
            self._trim()

    def locate(self, array: np.ndarray) -> tuple[Segment, int] | None:
        """The segment of this arena ``array``'s bytes lie in, and their offset there; None for
        an array elsewhere (or not contiguous). A gathered result, or an array from
        ``nbparallel.shared``, can so be scattered without a copy."""
        if not array.flags.c_contiguous or not array.nbytes:
            return None
        start = array.__array_interface__["data"][0]
        for entry in self._entries.values():
            if entry.state == "lent":
                base = entry.segment.address()
                if base <= start and start + array.nbytes <= base + entry.segment.size:
                    return entry.segment, start - base
        return None

    def lend(self, segment: Segment, token: np.ndarray) -> None:
        """The user now holds arrays built on ``token``; the segment is free again when they go."""
        entry = self._entries[segment.name]
        entry.state = "lent"
        entry.lent.append(weakref.ref(token))

    def held(self, engine: int, names: list[str] | set[str]) -> None:
        """Engine ``engine`` reports the segments it still holds views of (all of them)."""
        names = set(names)
        for name, entry in self._entries.items():
            if name in names:
                entry.held_by.add(engine)
            else:
                entry.held_by.discard(engine)

    def engine_gone(self, engine: int) -> None:
        self.held(engine, ())

    def forgotten(self) -> list[str]:
        """Names unlinked since the last call: engines should drop their mappings of them."""
        out, self._forgotten = self._forgotten, []
        return out

    def leased(self) -> list[str]:
        """Segments some call still holds: empty whenever no call is running."""
        return [name for name, e in self._entries.items() if e.state == "leased"]

    def in_use(self) -> int:
        return sum(e.segment.size for e in self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def close(self) -> None:
        """Unlink every segment; arrays lent to the user stay valid (the mapping outlives the name)."""
        for entry in self._entries.values():
            entry.segment.unlink()
            entry.segment.close()
        self._forgotten.extend(self._entries)
        self._entries.clear()

    # -- housekeeping --------------------------------------------------------------------------
    def _reclaim(self) -> None:
        for entry in self._entries.values():
            if entry.state == "lent":
                entry.lent = [ref for ref in entry.lent if ref() is not None]
                if not entry.lent:
                    entry.state = "free"

    def _drop(self, entry: _Entry) -> None:
        entry.segment.unlink()
        entry.segment.close()
        del self._entries[entry.segment.name]
        self._forgotten.append(entry.segment.name)

    def _make_room(self, size: int) -> None:
        spare = [e for e in self._entries.values() if e.state == "free" and not e.held_by]
        spare.sort(key=lambda e: e.last_used)
        while spare and (self.in_use() + size > self.budget or free_bytes() < size + MARGIN):
            self._drop(spare.pop(0))
        if self.in_use() + size > self.budget:
            raise NoRoom(f"{fmt.nbytes(size)} would exceed the shared-memory budget of "
                         f"{fmt.nbytes(self.budget)} ({fmt.nbytes(self.in_use())} in use)")
        if free_bytes() < size + MARGIN:
            raise NoRoom(f"/dev/shm has {fmt.nbytes(free_bytes())} free, {fmt.nbytes(size)} needed")

    def _trim(self) -> None:
        spare = [e for e in self._entries.values() if e.state == "free" and not e.held_by]
        spare.sort(key=lambda e: e.last_used)
        while spare and sum(e.segment.size for e in spare) > self.keep_free:
            self._drop(spare.pop(0))


def default_budget() -> int:
    """Half of /dev/shm, unless ``NBPARALLEL_SHM_BUDGET`` says otherwise."""
    text = os.environ.get("NBPARALLEL_SHM_BUDGET", "").strip()
    if text:
        return parse_size(text)
    return total_bytes() // 2 if available() else 0


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864; plain numbers are bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)
