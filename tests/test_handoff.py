"""An engine's hand-off outbox, in this process: segments are reused while warm, let go when idle."""

from __future__ import annotations

import gc
import os
import pickle
import time

import numpy as np

from nbparallel.dataplane import handoff, parcel


def _send(box: handoff.Outbox, value: np.ndarray) -> bytes:
    header, buffers = parcel.dumps(value)
    return box.pack(header, buffers)


def _names(box: handoff.Outbox) -> list[str]:
    return [s.name for s in box.segments]


def test_a_free_segment_is_reused_and_an_idle_one_let_go():
    box = handoff.Outbox(f"test-handoff-{os.getpid()}", idle=0.2)
    try:
        big, small = np.arange(300_000.0), np.arange(40_000.0)  # 2.4 MB and 320 KB
        got = handoff.receive(_send(box, big))
        np.testing.assert_array_equal(got, big)
        first = _names(box)
        assert os.path.exists(f"/dev/shm/{first[0]}")
        _send(box, big)  # the first is still read: a second segment
        assert len(box.segments) == 2
        del got
        gc.collect()
        _send(box, small)  # fits the one the receiver let go of
        assert len(box.segments) == 2 and first[0] in _names(box)
        handoff.forget()
        for seg in box.segments:
            seg.mm[0] = handoff.FREE  # as the receivers' finalizers do
        time.sleep(0.3)
        note = _send(box, small)
        # Both were idle longer than 0.2 s: dropped, their names unlinked, one fresh segment made.
        assert len(box.segments) == 1 and not set(first) & set(_names(box))
        assert not os.path.exists(f"/dev/shm/{first[0]}")
        name = pickle.loads(note[len(handoff.MARK):])[0]
        assert name == box.segments[0].name
    finally:
        box.close()
        handoff.forget()
