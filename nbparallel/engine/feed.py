"""The engine's half of a ``%%pmap``: one task per engine per map, pulling chunks until told to stop.

The notebook offers chunk ``<prefix><seq>`` on its own channel server for each engine (two
ahead); the engine gets them in order, asking for the next before it runs one, runs every item,
and puts the results back under ``<prefix><seq>/r`` without waiting for the acknowledgement, so
on busy cores an engine never waits for the notebook between two chunks. One ipyparallel task
per engine starts the map; the chunks and results never pass the controller or the scheduler,
which is what made a chunk cost a round trip of about 2 ms. The notebook's half is
``nbparallel/feed.py``.

Message bodies (signed, so unpickled only after the channel checked them):

* a chunk: header ``CHUNK`` + the cloudpickled payload note (its items, or where they lie in
  shared memory); ``STOP`` alone ends the map for this engine;
* a chunk's payload holds ``(index of its first item, its items)``: a list, a range or a slice
  of a NumPy array, iterated here as the notebook would;
* a result: header, a pickle of ``(seconds running the items, seconds in all, wall-clock start,
  segments still held, failure)``; one buffer, the pickled ``(values, failures by index)``.
"""

from __future__ import annotations

import pickle
import sys
import time
from typing import Any

import cloudpickle

from .. import gpu
from ..cellcode import RESULT_NAME, CellCode, compile_cell
from ..dataplane import parcel, remote
from ..dataplane.direct import Channel, ChannelError
from ..dataplane.transport import INLINE
from ..errors import RemoteFailure
from ..reaper import alive
from .replies import FeedReply
from .runner import base_namespace, failure, register_source

__all__ = ["CHUNK", "STOP", "run_pmap_feed"]

CHUNK, STOP = b"C", b"S"
#: The longest one wait for the next chunk may take: the notebook offers it (or STOP) as soon as
#: it knows, so waiting this long means the notebook is gone or something is wrong.
IDLE_LIMIT = 3600.0
#: A result's put is acknowledged by the notebook's server thread; it may be busy, not this busy.
PUT_TIMEOUT = 120.0


def run_pmap_feed(cell: CellCode, target: str, names_blob: bytes, endpoint: str, prefix: str,
                  notebook_pid: int | None) -> FeedReply:
    """Run the chunks the notebook offers under ``prefix`` until it offers STOP.

    ``notebook_pid`` is given when the notebook shares this host, so a wait for the next chunk
    ends at once if its process has gone.
    """
    register_source(cell)
    base = base_namespace(names_blob)  # once per map, not once per chunk
    body = compile_cell(cell)
    bind = compile(f"{target} = __nbparallel_item__", "<%%pmap target>", "exec")
    channel = _channel(endpoint, notebook_pid)
    if channel.outstanding:  # an interrupted map's requests: their answers must not come here
        channel.reset()
    seq = 0
    try:
        with _Printed() as printed:
            channel.ask(f"{prefix}0", timeout=IDLE_LIMIT)
            while True:
                header, _ = _next(channel, f"{prefix}{seq}")
                if header[:1] != CHUNK:
                    break
                # Asked before this chunk runs, so its answer is here when the chunk is done:
                # on two busy cores the notebook may not get a core for milliseconds.
                channel.ask(f"{prefix}{seq + 1}", timeout=IDLE_LIMIT)
                _run_chunk(channel, f"{prefix}{seq}/r", header, base, body, bind, cell.filename)
                seq += 1
        # Told before this task's reply, which takes milliseconds more through the controller:
        # the notebook waits for that reply only to show what the items printed. Waited for,
        # so every result put before it has arrived too. An engine that ran no chunk has
        # nothing to tell (it may start long after the map, behind other work).
        if seq:
            channel.put(f"{prefix}end", pickle.dumps(printed.any), [])
    except BaseException:
        channel.reset()
        raise
    return FeedReply(seq)


def _run_chunk(channel: Channel, tid: str, header: bytes, base: dict[str, Any], body: Any,
               bind: Any, filename: str) -> None:
    started, t0 = time.time(), time.perf_counter()
    values, failed, start, lost, held, run = [], {}, 0, None, None, 0.0
    try:
        note = cloudpickle.loads(header[1:])
        start, part = remote.open_payload(note)["items"]
    except Exception as exc:  # a payload that did not open: the notebook fails its items
        lost = failure(exc, "")
    else:
        t1 = time.perf_counter()
        values, failed = _run_items(base, body, bind, filename, start, part)
        run = time.perf_counter() - t1
        del part
        if note.transport != INLINE:
            held = tuple(remote.held())
    meta = pickle.dumps((run, time.perf_counter() - t0, started, held, lost))
    channel.put(tid, meta, [_packed(values, failed, start)], wait=False)


class _Printed:
    """Whether this task wrote anything to stdout or stderr: their ``write`` is wrapped on the
    stream objects themselves, where both ``print`` and ipykernel's reader of the file
    descriptors (a C library's output) call it. Where a stream cannot be wrapped, assume it
    did, so the notebook waits for the output."""

    def __init__(self) -> None:
        self.any = False
        self._wrapped: list[Any] = []

    def __enter__(self) -> "_Printed":
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.write = self._counting(stream.write)
            except (AttributeError, TypeError):  # a built-in stream: no instance attributes
                self.any = True
            else:
                self._wrapped.append(stream)
        return self

    def _counting(self, write: Any) -> Any:
        def counted(text: str) -> Any:
            self.any = True
            return write(text)
        return counted

    def __exit__(self, *exc: object) -> None:
        for stream in self._wrapped:
            try:
                del stream.write  # the class's method again
                stream.flush()
            except Exception:  # a stream the cell replaced or closed
                self.any = True


def _next(channel: Channel, tid: str) -> tuple[bytes, list[memoryview]]:
    try:
        return channel.get(tid)
    except ChannelError as exc:
        raise ChannelError(
            f"this engine waited for the next %%pmap chunk ({tid}) and got none: {exc}"
        ) from None


def _channel(endpoint: str, notebook_pid: int | None) -> Channel:
    # Watched only if this engine can see it: a shared /dev/shm does not mean a shared pid
    # namespace (containers), and a pid seen gone from the start would fail every map.
    if notebook_pid is not None and not alive(notebook_pid):
        notebook_pid = None
    return remote.connect(endpoint, "the notebook's channel", PUT_TIMEOUT,
                          gone=lambda: _notebook_gone(notebook_pid))


def _run_items(base: dict[str, Any], body: Any, bind: Any, filename: str, start: int,
               part: Any) -> tuple[list[Any], dict[int, RemoteFailure]]:
    """The results of ``part`` (items ``start``, ``start + 1``, ...), None where an item
    failed, and the failures by item index."""
    values: list[Any] = []
    failed: dict[int, RemoteFailure] = {}
    for index, item in enumerate(part, start):
        ns = dict(base)
        ns["__nbparallel_item__"] = item
        try:
            exec(bind, ns)
            exec(body, ns)
        except Exception as exc:  # recorded per item, the rest of the chunk still runs
            failed[index] = failure(exc, filename, item=index)
            values.append(None)
            continue
        values.append(gpu.to_host(ns.get(RESULT_NAME)))
    return values, failed


def _packed(values: list[Any], failed: dict[int, RemoteFailure], start: int) -> bytes:
    """A chunk's results, pickled; a result that cannot be becomes its item's failure."""
    try:
        return parcel.pickled((values, failed))
    except Exception:
        pass
    for index, value in enumerate(values, start):
        try:
            cloudpickle.dumps(value)
        except Exception as exc:
            why = (f"the result (a {type(value).__name__}) cannot be sent back to the notebook: "
                   f"{type(exc).__name__}: {exc}. Return plain data (numbers, arrays, lists, "
                   f"dicts) instead.")
            failed[index] = RemoteFailure(-1, "UsageError", why, why, item=index)
            values[index - start] = None
    return cloudpickle.dumps((values, failed))


def _notebook_gone(pid: int | None) -> str | None:
    if pid is not None and not alive(pid):
        return f"the notebook's process {pid} has stopped"
    return None
