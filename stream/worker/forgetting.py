"""Forget requests applied: the right to be forgotten, between experiences.

Owns where the forget topic is read from (the checkpoint's offsets: a
request is applied once, and again after going back to a checkpoint that
predates it, which is harmless because an erasure is idempotent). For each
request the learner drops the user's history, pending samples and replay
samples (``learners.state.erasure``), the publisher drops the user's queued vector
and sends a tombstone for it, and ``on_erased`` asks for a checkpoint at once,
after which the older checkpoints, which still hold the user, are removed.

Erasing touches what training reads, so the loop calls ``apply`` only while no
experience trains and no checkpoint is being prepared. The model weights are
shared by every user and are not per-user data: they stay as they are.
"""

from __future__ import annotations

import logging
from typing import Callable

from learners.state.erasure import erase_user
from learners.records import BadRecord
from stream.config import Settings
from stream.kafka.forget import parse_forget
from stream.metrics import WorkerMetrics
from stream.worker.consumers import Consumers
from stream.worker.publisher import Publisher

log = logging.getLogger("stream.worker")

# Requests read per turn at most: each one is a few array writes, but a burst must not hold the loop.
_PER_TURN = 100


class Forgetting:
    def __init__(self, settings: Settings, learner, metrics: WorkerMetrics, consumers: Consumers,
                 publisher: Publisher, on_erased: Callable[[], None]) -> None:
        self.settings = settings
        self.learner = learner
        self.metrics = metrics
        self.consumers = consumers
        self.publisher = publisher
        self.on_erased = on_erased
        self._start: dict[int, int] = {}  # where the forget topic is read from (the checkpoint's)

    @property
    def start(self) -> dict[int, int]:
        return dict(self._start)

    def offsets(self) -> dict[int, int]:
        """The next forget offset per partition applied (where a checkpoint taken now reads on)."""
        follower = self.consumers.forget
        return dict(follower.offsets) if follower is not None else dict(self._start)

    def restore(self, start: dict[int, int]) -> None:
        """Read on from a checkpoint's forget offsets."""
        self._start = dict(start)
        if self.consumers.forget is not None:
            self.consumers.forget.restart_from(self._start)

    def apply(self) -> int:
        """Read the forget requests that arrived and apply them; returns how many users were erased."""
        follower = self.consumers.forget
        if follower is None:
            return 0
        records = follower.next_batch(timeout_ms=0, max_records=_PER_TURN)
        if not records:
            return 0
        bad, erased = [], 0
        for record in records:
            user_id = parse_forget(record.key, record.value)
            if isinstance(user_id, BadRecord):
                bad.append((user_id, record))
                continue
            erasure = erase_user(self.learner, user_id)
            self.publisher.forget_user(user_id)  # its queued vector dropped, a tombstone sent
            self.metrics.users_erased.inc()
            erased += 1
            log.info("forget request applied for a user (%s): %s", "found" if erasure.found else "nothing held",
                     f"{int(erasure.history)} history, {erasure.pending_samples} pending and "
                     f"{erasure.replay_samples} replay samples removed")
        self.publisher.dead_letter(bad)
        if erased:
            self.metrics.pending.set(self.learner.pending)
            self.on_erased()
        return erased
