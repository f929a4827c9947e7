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

import os
import pickle
import time
import zlib
from typing import Any, Sequence

import numpy as np

from ..dataplane.shm import GRAIN, MARGIN, NoRoom, Segment, free_bytes
from ..dataplane.transport import SHM
from ..errors import CommError, PeerFailed
from ..reaper import alive
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
        self._mm = self._ctl.mm
        self._bytes = np.frombuffer(self._mm, np.uint8)
        # Control words through a memoryview: a word read costs tens of ns, a NumPy one ~10x that,
        # and a small collective reads a dozen.
        self._q = memoryview(self._mm).cast("q")
        self._me = rank * _WORDS
        self._others = [r for r in range(self.size) if r != rank]
        self._peer_counters = [r * _WORDS + COUNTER for r in self._others]
        self._q[self._me + PID] = os.getpid()
        self._q[self._me + STATE] = RUNNING
        self._count = self._q[self._me + COUNTER]
        self._slots: list[Segment | None] = [None, None]
        self._views: list[Any] = [None, None]
        self._peer_slots: dict[tuple[int, int], tuple[Segment, np.ndarray]] = {}
        self._written: dict[int, str] = {}  # text field -> what this rank last wrote there
        self._sigs: dict[str, int] = {}
        self._pid_look = 0.0

    # -- this rank's block ---------------------------------------------------------------------
    def _text(self, rank: int, at: int, size: int = _TEXT) -> str:
        raw = self._mm[rank * BLOCK + at:rank * BLOCK + at + size]
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def _write_text(self, at: int, text: str, size: int = _TEXT) -> None:
        if self._written.get(at) == text:  # a loop makes the same call again and again
            return
        raw = text.encode("utf-8")[:size - 1] + b"\0"
        start = self.rank * BLOCK + at
        self._mm[start:start + len(raw)] = raw
        self._written[at] = text

    def _word(self, rank: int, w: int) -> int:
        return self._q[rank * _WORDS + w]

    def enter(self, call: Call) -> None:
        self._write_text(_CURRENT, call.desc)
        self._q[self._me + CUR_SEQ] = call.seq
        self._q[self._me + CUR_LINE] = call.line

    # -- rounds --------------------------------------------------------------------------------
    def round(self, call: Call, mode: str, items: Sequence[Any]) -> Round:
        count = self._count + 1
        p = count & 1
        q, mine = self._q, self._me + _PARITY + 8 * p
        sig = self._sigs.get(call.desc)
        if sig is None:
            sig = self._sigs[call.desc] = zlib.crc32(call.desc.encode())
        self._publish(p, items)
        self._write_text(_DESCS[p], call.desc)
        q[mine + SEQ] = call.seq
        q[mine + SIG] = sig
        q[mine + LINE] = call.line
        self._count = count
        q[self._me + COUNTER] = count  # last: the others read the round once they see this
        self._wait(count, call)
        for r in self._others:
            at = r * _WORDS + _PARITY + 8 * p
            if q[at + SIG] != sig or q[at + SEQ] != call.seq:
                raise mismatch({r: (self._word(r, _PARITY + 8 * p + SEQ), self._text(r, _DESCS[p]),
                                    self._word(r, _PARITY + 8 * p + LINE))
                                for r in range(self.size)})
        return _ShmRound(self, p, mode)

    def _publish(self, p: int, items: Sequence[Any]) -> None:
        q, base = self._q, self._me + _PARITY + 8 * p
        blob_start = self.rank * BLOCK + _INLINE[p]
        if len(items) == 1 and not isinstance(items[0], (np.ndarray, tuple)):
            # One object for everyone (a number, a small dict) or nothing: its pickle alone,
            # marked by a negative length; 0 is nothing at all (a barrier).
            if items[0] is None:
                q[base + BLOB] = 0
                return
            try:
                raw = pickle.dumps(items[0], protocol=pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, AttributeError, TypeError):
                raw = b""
            if 0 < len(raw) <= _INLINE_SIZE:
                self._mm[blob_start:blob_start + len(raw)] = raw
                q[base + BLOB] = -len(raw)
                return
        index, frames = wire.encode(items)
        spans, end = wire.place(frames)
        blob = pickle.dumps((index, spans), protocol=pickle.HIGHEST_PROTOCOL)
        data_at = (len(blob) + 63) // 64 * 64
        if data_at + end > _INLINE_SIZE:
            if len(blob) > _INLINE_SIZE:
                raise CommError(
                    f"a comm call with {len(items)} parts has too large an index for one round "
                    f"({len(blob)} bytes); send fewer, larger parts (e.g. one array instead of a "
                    f"list of many)."
                )
            data = self._slot(p, end)
            data_at = 0
            where = -1  # the frames are in this rank's slot
        else:
            data = self._bytes[blob_start:blob_start + _INLINE_SIZE]
            where = data_at
        for (offset, n), frame in zip(spans, frames):
            if not n:
                continue
            dest = data[data_at + offset:data_at + offset + n]
            if isinstance(frame, np.ndarray):
                if _at(frame) == _at(dest):  # written in place through reserve()
                    continue
                dest[:] = frame.reshape(-1).view(np.uint8)
            else:
                dest[:] = np.frombuffer(frame, np.uint8)
        self._mm[blob_start:blob_start + len(blob)] = blob
        q[base + BLOB] = len(blob)
        q[base + DATA] = where

    def _slot(self, p: int, need: int) -> np.ndarray:
        """This rank's own segment for parity ``p``, at least ``need`` bytes."""
        seg = self._slots[p]
        if seg is None or seg.size < need:
            size = max(GRAIN, -(-need // GRAIN) * GRAIN)
            if seg is not None:  # grows by half at least, so a size names one segment
                size = max(size, seg.size * 3 // 2 // GRAIN * GRAIN)
            new = _create(size, slot_owner(self.spec))
            if seg is not None:
                seg.unlink()
                seg.close()
            self._slots[p] = seg = new
            self._views[p] = np.frombuffer(seg.mm, np.uint8)
            name = seg.name.encode()
            start = self.rank * BLOCK + _NAMES[p]
            self._mm[start:start + _NAME] = name.ljust(_NAME, b"\0")
            self._q[self._me + _PARITY + 8 * p + SLOT] = seg.size
        return self._views[p]

    def reserve(self, nbytes: int) -> np.ndarray | None:
        # The next round's parity was last published two rounds ago: every rank has read it.
        return self._slot((self._count + 1) & 1, nbytes)[:nbytes]

    def _peer_slot(self, rank: int, p: int) -> np.ndarray:
        size = self._word(rank, _PARITY + 8 * p + SLOT)
        seen = self._peer_slots.get((rank, p))
        if seen is not None and seen[0].size == size:  # a rank's slot only grows: same size, same one
            return seen[1]
        if seen is not None:
            seen[0].close()
        name = self._text(rank, _NAMES[p], _NAME)
        try:
            seg = Segment.attach(name, size)
        except OSError as exc:
            raise PeerFailed(f"rank {rank}'s part of this round is gone ({exc.strerror}): "
                             f"its engine stopped or restarted.") from None
        view = np.frombuffer(seg.mm, np.uint8)
        self._peer_slots[rank, p] = (seg, view)
        return view

    def read(self, rank: int, p: int, pick: int, copy: bool) -> Any:
        base = rank * _WORDS + _PARITY + 8 * p
        start = rank * BLOCK + _INLINE[p]
        blob_len = self._q[base + BLOB]
        if blob_len <= 0:  # nothing, or one pickled object (see _publish)
            if blob_len == 0:
                return None
            self.received[rank] -= blob_len
            return pickle.loads(self._mm[start:start - blob_len])
        data_at = self._q[base + DATA]
        index, spans = pickle.loads(self._mm[start:start + blob_len])
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
    def _arrived(self, target: int) -> bool:
        q = self._q
        for at in self._peer_counters:
            if q[at] < target:
                return False
        return True

    def _wait(self, target: int, call: Call) -> None:
        if self._arrived(target):
            return
        since = time.monotonic()
        self._q[self._me + WAITING] = int(time.time() * 1000)
        next_look = since + LOOK
        spins = 0
        try:
            while not self._arrived(target):
                spins += 1
                if spins > 200:
                    # Two engines may share one core with the notebook: give it back soon.
                    time.sleep(0 if spins < 2000 else 2e-4 if spins < 20000 else 1e-3)
                    now = time.monotonic()
                    if now >= next_look:
                        self.look([r for r in self._others
                                   if self._word(r, COUNTER) < target], call, since)
                        next_look = now + LOOK
        finally:
            self._q[self._me + WAITING] = 0

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
                if pid and not alive(pid):
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
        self._q[self._me + STATE] = FAILED if failure is not None else LEFT
        # Only unmapped: a slower rank may still read this rank's last round. The notebook
        # unlinks the comm's segments once every rank has answered.
        self._views = [None, None]
        for seg in [*self._slots, *(seg for seg, _ in self._peer_slots.values())]:
            if seg is not None:
                seg.close()
        self._slots = [None, None]
        self._peer_slots.clear()
        self._q.release()
        del self._bytes, self._mm
        self._ctl.close()


class _ShmRound(Round):
    def __init__(self, backend: ShmBackend, parity: int, mode: str):
        self.backend, self.parity, self.mode = backend, parity, mode

    def get(self, source: int, copy: bool = True) -> Any:
        pick = 0 if self.mode == EVERYONE else self.backend.rank
        return self.backend.read(source, self.parity, pick, copy)


def _at(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _create(size: int, owner: str) -> Segment:
    if free_bytes() - size < MARGIN:
        raise _no_room(size)
    try:
        return Segment.create(size, owner)  # its pages reserved: no SIGBUS later
    except NoRoom:
        raise _no_room(size) from None


def _no_room(size: int) -> CommError:
    return CommError(
        f"shared memory (/dev/shm) has no room for a {size >> 20} MiB comm buffer. Free some "
        f"(fewer resident arrays, other kernels), or run the cell with --comm direct."
    )

