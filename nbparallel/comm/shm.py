"""Collectives between engines of one host, through shared memory.

The notebook makes one control segment per cell (``CommSpec.control``), one block of
:data:`~nbparallel.comm.spec.BLOCK` bytes per rank. Each rank writes only its own block and reads
the others'. A round is: write the contribution (small ones into the block itself, large ones
into a segment of this rank's own), then raise this rank's counter. A rank waits until every
counter has reached its own, then reads the others' contributions in place. Nothing is gathered
on one rank: in an allreduce every rank reduces its block straight out of its peers' memory.

Two areas (by the round's parity) alternate, so a rank may write round ``n + 1`` while a slower
rank still reads round ``n``: every rank has finished reading round ``n - 1`` before anyone
passes round ``n``. This relies on stores becoming visible in program order (x86-64's TSO;
the counter is written after the data it guards).

A rank's own segments are named after the cell's comm id; the notebook unlinks them when the
cell has ended on every rank (also what a killed engine left), so no rank can lose a round it
still reads.
"""

from __future__ import annotations

import mmap
import os
import pickle
import time
import zlib
from typing import Any, Sequence

import numpy as np

from ..dataplane.shm import GRAIN, MARGIN, SHM_DIR, Segment, free_bytes, new_name
from ..dataplane.transport import SHM
from ..errors import CommError, PeerFailed
from . import items as wire
from .backend import EVERYONE, LOOK, Backend, Call, Round, mismatch
from .spec import BLOCK, CommSpec

__all__ = ["ShmBackend", "slot_owner"]

_WORDS = BLOCK // 8
# int64 words of a rank's block
COUNTER, STATE, PID, CUR_SEQ, CUR_LINE, WAITING = range(6)
_PARITY = 8  # per parity p, words _PARITY + 8p + ...: the round's call and where its data is
SEQ, SIG, LINE, BLOB, DATA, SLOT = range(6)
# byte ranges of a rank's block
_NAMES = (512, 640)  # slot segment name per parity (128 bytes each)
_NAME = 128
_DESCS = (768, 1024)  # call description per parity (256 bytes each)
_CURRENT = 1280       # description of the call this rank is in now (256 bytes)
_FAILURE = 1536       # why this rank failed (512 bytes)
_FAILURE_SIZE = 512
_INLINE = (2048, 5120)  # per parity: the blob (index) then small frames, 3072 bytes each
_INLINE_SIZE = 3072
_TEXT = 256

RUNNING, FAILED, LEFT = 1, 2, 3
PID_LOOK = 1.0  # seconds between checks that the other ranks' processes are alive


def slot_owner(spec: CommSpec) -> str:
    """What this comm's own segments are named after (the notebook removes them by it)."""
    return f"{spec.owner}-{spec.id}"


class ShmBackend(Backend):
    name = SHM

    def __init__(self, spec: CommSpec, rank: int):
        super().__init__(spec, rank)
        self._ctl = Segment.attach(spec.control, spec.size * BLOCK)
        self._bytes = np.frombuffer(self._ctl.mm, np.uint8)
        self._words = np.frombuffer(self._ctl.mm, np.int64)
        self._counters = self._words[COUNTER::_WORDS]
        self._mine = self._words[rank * _WORDS:(rank + 1) * _WORDS]
        self._mine[PID] = os.getpid()
        self._mine[STATE] = RUNNING
        self._count = int(self._mine[COUNTER])
        self._slots: list[Segment | None] = [None, None]
        self._peer_slots: dict[tuple[int, int], Segment] = {}
        self._pid_look = 0.0

    # -- this rank's block ---------------------------------------------------------------------
    def _text(self, rank: int, at: int, size: int = _TEXT) -> str:
        raw = bytes(self._bytes[rank * BLOCK + at:rank * BLOCK + at + size])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def _write_text(self, at: int, text: str, size: int = _TEXT) -> None:
        raw = text.encode("utf-8")[:size - 1] + b"\0"
        start = self.rank * BLOCK + at
        self._bytes[start:start + len(raw)] = np.frombuffer(raw, np.uint8)

    def _word(self, rank: int, w: int) -> int:
        return int(self._words[rank * _WORDS + w])

    def enter(self, call: Call) -> None:
        self._write_text(_CURRENT, str(call))
        self._mine[CUR_SEQ] = call.seq
        self._mine[CUR_LINE] = call.line

    # -- rounds --------------------------------------------------------------------------------
    def round(self, call: Call, mode: str, items: Sequence[Any]) -> Round:
        count = self._count + 1
        p = count % 2
        base = _PARITY + 8 * p
        self._publish(p, items)
        self._write_text(_DESCS[p], call.desc)
        self._mine[base + SEQ] = call.seq
        self._mine[base + SIG] = zlib.crc32(call.desc.encode())
        self._mine[base + LINE] = call.line
        self._count = count
        self._mine[COUNTER] = count  # last: the others read the round once they see this
        self._wait(count, call)
        sig = self._mine[base + SIG]
        seqs = self._words[base + SEQ::_WORDS]
        sigs = self._words[base + SIG::_WORDS]
        if (sigs != sig).any() or (seqs != call.seq).any():
            raise mismatch({r: (int(seqs[r]), self._text(r, _DESCS[p]), self._word(r, base + LINE))
                            for r in range(self.size)})
        return _ShmRound(self, p, mode)

    def _publish(self, p: int, items: Sequence[Any]) -> None:
        base = _PARITY + 8 * p
        index, frames = wire.encode(items)
        spans, end = wire.place(frames)
        blob_start = self.rank * BLOCK + _INLINE[p]
        where = 0  # frames inline, after the blob
        blob = pickle.dumps((index, spans), protocol=pickle.HIGHEST_PROTOCOL)
        data_at = (len(blob) + 63) // 64 * 64
        if data_at + end > _INLINE_SIZE:
            where = 1
            if len(blob) > _INLINE_SIZE:
                raise CommError(
                    f"a comm call with {len(items)} parts has too large an index for one round "
                    f"({len(blob)} bytes); send fewer, larger parts (e.g. one array instead of a "
                    f"list of many)."
                )
            data = self._slot(p, end)
            data_at = 0
        else:
            data = self._bytes[blob_start:blob_start + _INLINE_SIZE]
        for (offset, n), frame in zip(spans, frames):
            if n:
                data[data_at + offset:data_at + offset + n] = (
                    frame.reshape(-1).view(np.uint8) if isinstance(frame, np.ndarray)
                    else np.frombuffer(frame, np.uint8))
        self._bytes[blob_start:blob_start + len(blob)] = np.frombuffer(blob, np.uint8)
        self._mine[base + BLOB] = len(blob)
        self._mine[base + DATA] = data_at if where == 0 else -1

    def _slot(self, p: int, need: int) -> np.ndarray:
        """This rank's own segment for parity ``p``, at least ``need`` bytes."""
        seg = self._slots[p]
        if seg is None or seg.size < need:
            size = max(GRAIN, -(-need // GRAIN) * GRAIN)
            if seg is not None:
                size = max(size, seg.size * 3 // 2 // GRAIN * GRAIN)
            new = _create(size, slot_owner(self.spec))
            if seg is not None:
                seg.unlink()
                seg.close()
            self._slots[p] = seg = new
            name = seg.name.encode()
            start = self.rank * BLOCK + _NAMES[p]
            self._bytes[start:start + _NAME] = 0
            self._bytes[start:start + len(name)] = np.frombuffer(name, np.uint8)
            self._mine[_PARITY + 8 * p + SLOT] = seg.size
        return np.frombuffer(seg.mm, np.uint8)

    def _peer_slot(self, rank: int, p: int) -> np.ndarray:
        name = self._text(rank, _NAMES[p], _NAME)
        size = self._word(rank, _PARITY + 8 * p + SLOT)
        seg = self._peer_slots.get((rank, p))
        if seg is None or seg.name != name or seg.size != size:
            if seg is not None:
                seg.close()
            try:
                seg = self._peer_slots[rank, p] = Segment.attach(name, size)
            except OSError as exc:
                raise PeerFailed(f"rank {rank}'s part of this round is gone ({exc.strerror}): "
                                 f"its engine stopped or restarted.") from None
        return np.frombuffer(seg.mm, np.uint8)

    def read(self, rank: int, p: int, pick: int, copy: bool) -> Any:
        base = _PARITY + 8 * p
        start = rank * BLOCK + _INLINE[p]
        blob_len, data_at = self._word(rank, base + BLOB), self._word(rank, base + DATA)
        index, spans = pickle.loads(self._bytes[start:start + blob_len])
        if data_at < 0:
            buf, data_at = self._peer_slot(rank, p), 0
        else:
            buf = self._bytes[start:start + _INLINE_SIZE]
        spec = index[pick]
        if data_at:
            spans = [(o + data_at, n) for o, n in spans]
        self.received[rank] += wire.item_bytes(spec, spans)
        return wire.decode(spec, buf, spans, copy)

    # -- waiting -------------------------------------------------------------------------------
    def _wait(self, target: int, call: Call) -> None:
        counters = self._counters
        if counters.min() >= target:
            return
        since = time.monotonic()
        self._mine[WAITING] = int(time.time() * 1000)
        next_look = since + LOOK
        spins = 0
        try:
            while counters.min() < target:
                spins += 1
                if spins > 200:
                    # Two engines may share one core with the notebook: give it back soon.
                    time.sleep(0 if spins < 2000 else 2e-4 if spins < 20000 else 1e-3)
                    now = time.monotonic()
                    if now >= next_look:
                        self.look([r for r in range(self.size) if counters[r] < target], call, since)
                        next_look = now + LOOK
        finally:
            self._mine[WAITING] = 0

    def look(self, waiting: Sequence[int], call: Call, since: float) -> None:
        for r in waiting:
            state = self._word(r, STATE)
            if state == FAILED:
                raise PeerFailed(f"rank {r} failed while rank {self.rank} waited in {call}: "
                                 f"{self._text(r, _FAILURE, _FAILURE_SIZE)}")
            if state == LEFT and self._word(r, COUNTER) < self._count:
                raise PeerFailed(
                    f"rank {r} finished the cell without calling {call}: every rank must make "
                    f"the same comm calls (check conditions that depend on rank or on the data).")
        now = time.monotonic()
        if now - self._pid_look >= PID_LOOK:
            self._pid_look = now
            for r in waiting:
                pid = self._word(r, PID)
                if pid and not _alive(pid):
                    raise PeerFailed(f"rank {r} (engine {self.spec.engines[r]}, pid {pid}) died "
                                     f"while rank {self.rank} waited in {call}.")
        if now - since > self.spec.timeout:
            raise self.timeout(call, since, waiting, {r: self._where(r) for r in waiting})

    def _where(self, rank: int) -> str:
        if self._word(rank, PID) == 0:
            return ("has not started the cell (its engine is busy with other work, or the cell "
                    "is still queued behind it)")
        current = self._text(rank, _CURRENT) or "no comm call yet"
        since = self._word(rank, WAITING)
        if since:
            return f"is waiting in {current} for {time.time() - since / 1000:.0f} s"
        return f"is running its own code (its last comm call: {current})"

    def close(self, failure: str | None) -> None:
        if failure is not None:
            self._write_text(_FAILURE, failure, _FAILURE_SIZE)
        self._mine[STATE] = FAILED if failure is not None else LEFT
        # Only unmapped: a slower rank may still read this rank's last round. The notebook
        # unlinks the comm's segments once every rank has answered.
        for seg in [*self._slots, *self._peer_slots.values()]:
            if seg is not None:
                seg.close()
        self._slots = [None, None]
        self._peer_slots.clear()
        del self._counters, self._mine, self._words, self._bytes
        self._ctl.close()


class _ShmRound(Round):
    def __init__(self, backend: ShmBackend, parity: int, mode: str):
        self.backend, self.parity, self.mode = backend, parity, mode

    def get(self, source: int, copy: bool = True) -> Any:
        pick = 0 if self.mode == EVERYONE else self.backend.rank
        return self.backend.read(source, self.parity, pick, copy)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create(size: int, owner: str) -> Segment:
    """A segment whose pages are reserved now: a full /dev/shm is an error here, not a SIGBUS
    when the data is written."""
    if free_bytes() - size < MARGIN:
        raise _no_room(size)
    name = new_name(owner)
    path = SHM_DIR / name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            raise _no_room(size) from exc
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return Segment(name, size, mm)


def _no_room(size: int) -> CommError:
    return CommError(
        f"shared memory (/dev/shm) has no room for a {size >> 20} MiB comm buffer. Free some "
        f"(fewer resident arrays, other kernels), or run the cell with --transport direct."
    )

