"""Training for the worker: when an experience is due, on the background thread or between polls.

By default (``--background-training``) an experience runs on one background
thread while the loop keeps consuming and publishing user vectors (an
experience takes seconds on a CPU; between polls that would be the event ->
vector latency). Only the loop thread sets ``_training``; it hands work over
in ``_train()`` and takes the outcome back in ``_collect_training()``. The
learner's own lock guards what both threads touch (see
``ContinualRecommender.__init__``). Without background training, an
experience runs between polls and ``_keepalive`` (called after every
optimizer step) keeps the group membership alive with paused polls.

A mixin of ``stream.worker.Worker``: it reads and sets the worker's state.
"""

from __future__ import annotations

import logging
import time

from stream import heap

log = logging.getLogger("stream.worker")


class TrainingMixin:
    def _training_due(self) -> bool:
        pending = self.learner.pending
        if not pending:
            return False
        waited = time.monotonic() - self._last_train
        return pending >= self.settings.experience_size or waited >= self.settings.max_experience_wait_s

    def _train(self) -> None:
        if self.settings.overload == "sample":
            with self.learner.lock:
                shed = self.learner.shed_pending(self.settings.max_pending_events)
            if shed:
                self.metrics.train_shed.inc(shed)
        self._training = True
        if self._trainer is not None:
            self._training_job = self._trainer.submit(self._learn_and_publish)
            return
        try:
            self._learn_and_publish()
        finally:
            self._training = False
            self._end_keepalive()
        self._last_train = time.monotonic()

    def _collect_training(self, wait: bool = False) -> None:
        """Loop thread: take back a finished background experience (re-raising its error)."""
        job = self._training_job
        if job is None or not (wait or job.done()):
            return
        self._training_job = None
        self._training = False
        self._last_train = time.monotonic()
        job.result()

    def _learn_and_publish(self) -> None:
        """One experience, then republish the items it moved (on the trainer thread, or inline)."""
        report = self.learner.learn(max_samples=self.settings.experience_size)
        if report is None:
            return
        updated_at = time.monotonic()
        with self.learner.lock:
            moved = self.learner.items_to_publish(self.settings.item_publish_min_change)
        self._publish_items(moved, report.model_version)
        self._deliver(self.vectors)  # the loop thread alone delivers (and re-sends) dead letters
        m = self.metrics
        m.item_refresh.observe(time.monotonic() - updated_at)
        m.train_steps.inc(report.steps)
        m.train_samples.inc(report.samples)
        m.train_loss.set(report.loss)
        m.ewc_penalty.set(report.ewc_penalty)
        m.train_step_seconds.observe(report.seconds)
        m.model_version.set(report.model_version)
        m.last_model_update.set(time.time())
        m.replay_samples.set(report.replay_samples)
        m.pending.set(self.learner.pending)
        self._dirty_since_checkpoint = True
        heap.trim()

    def _keepalive(self) -> None:
        """Called after every training step: poll (with fetching paused) often enough that
        a long experience never exceeds max.poll.interval.ms and triggers a rebalance."""
        now = time.monotonic()
        if now - self._last_poll < self.settings.max_poll_interval_ms / 1000.0 / 4:
            return
        if self.events.rejoin_pending():
            # A rebalance waits for this member (up to max.poll.interval.ms). Polling now would
            # revoke partitions mid-experience, when no checkpoint can be written; the turn after
            # the experience checkpoints and commits first (_before_rebalance), then rejoins.
            self.metrics.beat()
            return
        if not self.events.paused:
            self.events.pause_all()
            self._paused_for_keepalive = True
        self._stash.extend(self.events.next_batch(timeout_ms=0))
        self._last_poll = now
        self.metrics.beat()

    def _end_keepalive(self) -> None:
        if self._paused_for_keepalive:
            self._paused_for_keepalive = False
            self.events.resume_all()

    def _backpressure(self) -> None:
        if self.settings.overload != "pause":
            return
        pending = self.learner.pending
        if not self.events.paused and pending >= self.settings.max_pending_events:
            self.events.pause_all()
            self.metrics.fetch_paused.set(1)
            log.info("training is behind (%d events waiting): fetching paused", pending)
        elif self.events.paused and pending < self.settings.experience_size:
            self.events.resume_all()
            self.metrics.fetch_paused.set(0)
