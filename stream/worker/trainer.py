"""Training for the worker: when an experience is due, on the background thread or between polls.

By default (``--background-training``) an experience runs on one background
thread while the loop keeps consuming and publishing user vectors (an
experience takes seconds on a CPU; between polls that would be the event ->
vector latency). Only the loop thread starts and collects an experience
(``train`` / ``collect``); the learner's own lock guards what both threads
touch (see ``ContinualRecommender.__init__``). Without background training,
an experience runs between polls and ``keepalive`` (called after every
optimizer step) keeps the group membership alive with paused polls.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Callable, Optional

from stream.config import Settings
from stream.metrics import WorkerMetrics
from stream.worker import heap
from stream.worker.consumers import Consumers
from stream.worker.ingest import Ingest
from stream.worker.publisher import Publisher

log = logging.getLogger("stream.worker")


class Trainer:
    def __init__(self, settings: Settings, learner, metrics: WorkerMetrics, consumers: Consumers,
                 ingest: Ingest, publisher: Publisher, on_trained: Callable[[], None]) -> None:
        self.settings = settings
        self.learner = learner
        self.metrics = metrics
        self.consumers = consumers
        self.ingest = ingest
        self.publisher = publisher
        self.on_trained = on_trained  # after every experience that changed the model (either thread)
        self._training = False  # set and cleared by the loop thread only
        self._pool: Optional[ThreadPoolExecutor] = None
        self._job: Optional[Future] = None
        self._last_train = time.monotonic()
        self._paused_for_keepalive = False
        self._rollbacks_counted = 0  # the learner's undone updates already in the metric

    def start(self) -> None:
        """The background thread, or keepalive polls between training steps."""
        if self.settings.background_training:
            if self._pool is None:
                # The loop polls all the time, so no keepalive polls (and never from the trainer thread).
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recstream-trainer")
        else:
            self.learner.on_step(self.keepalive)

    @property
    def executor(self) -> Optional[Executor]:
        """The training thread (None without background training): checkpoints are prepared there."""
        return self._pool

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # an experience in flight finishes first
        self._pool = None

    @property
    def training(self) -> bool:
        """An experience was started and not yet collected."""
        return self._training

    @property
    def in_flight(self) -> bool:
        """An experience is running on the background thread."""
        return self._job is not None

    @property
    def mid_experience(self) -> bool:
        """An experience has started and not finished: the model is between two consistent states."""
        return self._training and not (self._job is not None and self._job.done())

    def due(self) -> bool:
        pending = self.learner.pending
        if not pending:
            return False
        waited = time.monotonic() - self._last_train
        return pending >= self.settings.experience_size or waited >= self.settings.max_experience_wait_s

    def train(self) -> None:
        if self.settings.overload == "sample":
            with self.learner.lock:
                shed = self.learner.shed_pending(self.settings.max_pending_events)
            if shed:
                self.metrics.train_shed.inc(shed)
        self._training = True
        if self._pool is not None:
            self._job = self._pool.submit(self._learn_and_publish)
            return
        try:
            self._learn_and_publish()
        finally:
            self._training = False
            self._end_keepalive()
        self._last_train = time.monotonic()

    def collect(self, wait: bool = False) -> None:
        """Loop thread: take back a finished background experience (re-raising its error)."""
        job = self._job
        if job is None or not (wait or job.done()):
            return
        self._job = None
        self._training = False
        self._last_train = time.monotonic()
        job.result()

    def _learn_and_publish(self) -> None:
        """One experience, then republish the items it moved (on the trainer thread, or inline)."""
        report = self.learner.learn(max_samples=self.settings.experience_size)
        self._count_rollbacks()
        if report is None:
            return
        updated_at = time.monotonic()
        with self.learner.lock:  # sent under the lock: no older version's vectors can follow them
            moved = self.learner.items_to_publish(self.settings.item_publish_min_change)
            self.publisher.publish_items(moved, report.model_version)
        self.publisher.deliver_vectors()  # the loop thread alone delivers (and re-sends) dead letters
        m = self.metrics
        m.item_refresh.observe(time.monotonic() - updated_at)
        m.train_steps.inc(report.steps)
        m.train_samples.inc(report.samples)
        for reason, count in report.suspected.items():
            m.events_suspected.labels(reason).inc(count)
        m.train_loss.set(report.loss)
        m.ewc_penalty.set(report.ewc_penalty)
        m.train_step_seconds.observe(report.seconds)
        m.model_version.set(report.model_version)
        m.last_model_update.set(time.time())
        m.replay_samples.set(report.replay_samples)
        m.pending.set(self.learner.pending)
        self.on_trained()
        heap.trim()

    def _count_rollbacks(self) -> None:
        """Updates the learner's guard undid (it logs each one; stand-in learners have no guard)."""
        undone = getattr(self.learner, "rollbacks", 0) - self._rollbacks_counted
        if undone > 0:
            self.metrics.model_rollbacks.labels(reason="quality").inc(undone)
            self._rollbacks_counted += undone

    def keepalive(self) -> None:
        """Called after every training step: poll (with fetching paused) often enough that
        a long experience never exceeds max.poll.interval.ms and triggers a rebalance."""
        now = time.monotonic()
        if now - self.ingest.last_poll < self.settings.max_poll_interval_ms / 1000.0 / 4:
            return
        events = self.consumers.events
        if events.rejoin_pending():
            # A rebalance waits for this member (up to max.poll.interval.ms). Polling now would
            # revoke partitions mid-experience, when no checkpoint can be written; the turn after
            # the experience checkpoints and commits first (Membership.before_rebalance), then rejoins.
            self.metrics.beat()
            return
        if not events.paused:
            events.pause_all()
            self._paused_for_keepalive = True
        self.ingest.poll_into_stash()
        self.metrics.beat()

    def _end_keepalive(self) -> None:
        if self._paused_for_keepalive:
            self._paused_for_keepalive = False
            self.consumers.events.resume_all()

    def backpressure(self) -> None:
        if self.settings.overload != "pause":
            return
        events = self.consumers.events
        pending = self.learner.pending
        if not events.paused and pending >= self.settings.max_pending_events:
            events.pause_all()
            self.metrics.fetch_paused.set(1)
            log.info("training is behind (%d events waiting): fetching paused", pending)
        elif events.paused and pending < self.settings.experience_size:
            events.resume_all()
            self.metrics.fetch_paused.set(0)
