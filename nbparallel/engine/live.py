"""Telemetry from inside a long task, published a few times a second while it runs.

A pipeline rank runs one ipyparallel task for the whole run, so its spans would reach the
notebook only at the end. ipyparallel's data publication (``publish_data``) sends a dict to the
notebook on the task's IOPub channel while the task runs; the notebook merges what arrives into
``AsyncResult.data``. Each batch goes under a key of its own, so none overwrites another.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["Publisher", "PERIOD"]

PERIOD = 0.25  # seconds between batches: 4 a second feeds a dashboard redrawn 2-4 times a second


class Publisher:
    """Publishes the part of a growing span list the notebook has not had yet."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.count = 0  # spans already published
        self.seq = 0

    def maybe(self, spans: list[Any], **extra: Any) -> None:
        """Publish ``spans[count:]`` (and ``extra``) if :data:`PERIOD` has passed since the last batch."""
        now = time.monotonic()
        if now - self.last < PERIOD or len(spans) == self.count:
            return
        self.last = now
        try:
            from ipyparallel.datapub import publish_data

            publish_data({f"nbp{self.seq}": {"k": self.count, "spans": spans[self.count:], **extra}})
        except Exception:
            return  # not inside an engine task: nothing listens, and the reply carries it all
        self.count = len(spans)
        self.seq += 1
