"""Whether the worker is stopping or closing, and the waits that stay responsive to ``stop()``."""

from __future__ import annotations

import time

from stream.metrics import WorkerMetrics


class Lifecycle:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.stopping = False  # stop() was asked for: finish the turn in hand and return
        self.asked_to_stop = False  # this process was asked (a signal), not only its group (--distributed)
        self.closing = False  # leaving the group: its revocation needs no checkpoint

    def sleep(self, seconds: float) -> None:
        """Wait without spinning, staying responsive to ``stop()`` and keeping /healthz fresh."""
        deadline = time.monotonic() + seconds
        while not self.stopping:
            self.metrics.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.25, left))
