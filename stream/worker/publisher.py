"""What the worker sends to Kafka: user and item vectors, dead letters, and their delivery.

Nothing is dropped: ``deliver`` waits until everything sent is acknowledged,
sending again (through a fresh producer if need be) for as long as Kafka
refuses it; a checkpoint -- and so a commit -- never happens before that.
``PublishedVersionMark`` is advanced before any vector of a new model version
goes out (stream/kafka/recovery.py).
"""

from __future__ import annotations

import logging
import threading
import time
from operator import attrgetter
from typing import Optional

import numpy as np

from learners.errors import RecstreamError
from learners.state.explain import learner_history_items
from learners.records import BadRecord
from stream.config import Settings
from stream.kafka.clients import SourceRecord
from stream.kafka.errors import BrokerError
from stream.kafka.messages import encode_vectors, user_extras
from stream.kafka.recovery import PublishedVersionMark
from stream.kafka.sinks import ChangelogSink, DeadLetterSink, VectorSink, make_producer
from stream.metrics import WorkerMetrics
from stream.worker.dead_letter_book import DeadLetterBook
from stream.worker.isolation import apply_isolated, failure_detail
from stream.worker.lifecycle import Lifecycle
from stream.worker.totals import Totals

log = logging.getLogger("stream.worker")

# Broker trouble: waits between attempts double from the first to the last value.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
# One attempt to reach the cluster when (re)connecting; kafka-python's default is 30 s.
BOOTSTRAP_TIMEOUT_MS = 5000
# Users touched by events are published together once the first of them waited this long
# (and always before a checkpoint): each user at most once per window, one vector
# computation and one hand-over to the producer per window, however many polls it spans.
USER_PUBLISH_WINDOW_S = 0.05
# Between checkpoints the loop waits for Kafka only when this many vectors are unacknowledged:
# a producer that falls behind then slows the loop (the backlog waits in the events topic)
# instead of growing in memory until the next checkpoint has to wait for all of it.
MAX_UNACKNOWLEDGED_VECTORS = 2000
_TIMESTAMP_OF = attrgetter("timestamp_ms")


class Undelivered(RecstreamError):
    """Asked to stop while Kafka still refuses records this worker sent: no final checkpoint."""


class Publisher:
    """Owns the producer and its sinks (vectors, dead letters and, once opened, the partition-state
    changelog), the user publish window and the published versions."""

    def __init__(self, settings: Settings, learner, metrics: WorkerMetrics, totals: Totals,
                 dead_letter_book: DeadLetterBook, lifecycle: Lifecycle) -> None:
        self.settings = settings
        self.learner = learner
        self.metrics = metrics
        self.totals = totals
        self.book = dead_letter_book
        self.lifecycle = lifecycle
        self.producer = None
        self.vectors: Optional[VectorSink] = None
        self.dead_letters: Optional[DeadLetterSink] = None
        self.changelog: Optional[ChangelogSink] = None  # stream/worker/handover.py opens it
        self._producer_lock = threading.Lock()  # renew_producer from the loop or the trainer thread
        self._queued: dict[str, SourceRecord] = {}  # users whose vectors wait for the window, in order
        self._queued_stamps: list[int] = []  # their events' Kafka timestamps (ms)
        self._queued_since = 0.0
        self._item_versions: dict[str, int] = {}  # item id -> model version its last vector went out with
        self.version_mark = PublishedVersionMark(settings.state_dir)
        self.publishes_items = True  # False on every rank of a --distributed group but rank 0

    def attach(self, producer) -> None:
        """Send through ``producer`` from now on (None: connection given up)."""
        self.producer = producer
        if producer is None:
            self.vectors = self.dead_letters = self.changelog = None
        else:
            self.vectors = VectorSink(producer, self.settings.vectors_topic)
            self.dead_letters = DeadLetterSink(producer, self.settings.dlq_topic)

    def open_changelog(self, partitions: int) -> ChangelogSink:
        """Send partition state to the changelog topic, which has ``partitions`` partitions."""
        self.changelog = ChangelogSink(self.producer, self.settings.changelog_topic, partitions)
        return self.changelog

    @property
    def _sinks(self) -> tuple:
        return tuple(sink for sink in (self.vectors, self.dead_letters, self.changelog) if sink is not None)

    def close(self, timeout: float) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.close(timeout=timeout)

    def dead_letter(self, bad: list[tuple[BadRecord, SourceRecord]], count_as_event: bool = True) -> None:
        """Send bad records to the dead-letter topic, once each. ``count_as_event``: they are events
        that were not applied (the totals count them as dead-lettered instead of valid)."""
        if not bad:
            return
        fresh = []
        for parsed, record in bad:
            # Remembered until a checkpoint holds its offset: if this worker goes back to the
            # last checkpoint, the record is read again but not sent again.
            if self.book.claim((record.topic, record.partition, record.offset)):
                fresh.append((parsed, record))
            if count_as_event:
                self.metrics.dead_lettered.labels(reason=parsed.reason).inc()
                if record.topic == self.settings.events_topic:
                    self.totals.dead_lettered += 1
        if fresh:
            self.dead_letters.write_batch(fresh)
        if len(fresh) < len(bad):
            log.info("%d bad record(s) were already in the dead-letter topic (sent before a restart or "
                     "rollback): not sent again", len(bad) - len(fresh))
        log.debug("dead-lettered %d record(s)", len(fresh))

    def dead_letter_ends(self) -> dict[int, int]:
        """The next offset per dead-letter partition of what this producer wrote."""
        return self.dead_letters.next_offsets

    def deliver(self, *sinks) -> None:
        """Wait until everything sent to ``sinks`` (default: all of them) is in Kafka.

        Nothing is dropped: records the producer gave up on are sent again, with a
        growing pause, for as long as the broker refuses them; a checkpoint (and so a
        commit) never happens before this returns. Asked to stop meanwhile, it raises
        ``Undelivered`` and the worker exits without a final checkpoint.
        """
        sinks = sinks or self._sinks
        delay = RETRY_FIRST_S
        attempts = 0
        while True:
            producer = self.producer
            errors = []
            for sink in sinks:
                try:
                    sink.flush(timeout=10.0)
                except BrokerError as exc:
                    errors.append(exc)
            if not errors:
                return
            for exc in errors:
                self.metrics.broker_error("produce", exc)
            if self.lifecycle.stopping:
                raise Undelivered(str(errors[0]))
            log.warning("Kafka did not take our output (%s); sending again in %.1fs", errors[0], delay)
            self.lifecycle.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_S)
            attempts += 1
            if attempts % 3 == 0:
                # A producer can get stuck for good (e.g. its idempotent producer id is unknown to a
                # broker that lost its state): a fresh one gets a new id.
                self.renew_producer(producer)
            for sink in sinks:
                sink.resend()

    def deliver_vectors(self) -> None:
        """Wait for the vectors only (the trainer thread's part; the loop delivers dead letters)."""
        self.deliver(self.vectors)

    def renew_producer(self, failing) -> None:
        with self._producer_lock:
            if self.producer is not failing:
                return  # the other thread renewed it already
            try:
                fresh = make_producer(self.settings, bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
            except BrokerError as exc:
                self.metrics.broker_error("connect", exc)
                log.warning("could not create a new Kafka producer (%s); trying again later", exc)
                return
            log.warning("Kafka keeps refusing our output: replaced the producer; records the old one had not "
                        "delivered are sent again through the new one")
            for sink in self._sinks:
                sink.use_producer(fresh)
            self.producer = fresh
        try:
            failing.close(timeout=0)  # its undelivered records fail now and are parked for resend()
        except Exception as exc:  # noqa: BLE001 - whatever state the old producer is in, it is given up
            log.warning("closing the old producer failed: %s", exc)

    @property
    def has_queued_users(self) -> bool:
        return bool(self._queued)

    def queue_users(self, user_ids: list[str], sources: list[SourceRecord]) -> None:
        """Remember users touched by events for publishing, with each user's latest event record
        (dead-lettered should their vector fail) and the events' Kafka timestamps (ms)."""
        if not user_ids:
            return
        if not self._queued:
            self._queued_since = time.monotonic()
        self._queued.update(zip(user_ids, sources))
        self._queued_stamps.extend(map(_TIMESTAMP_OF, sources))

    def forget_user(self, user_id: str) -> None:
        """An erased user: their queued vector is not sent, and a tombstone (key ``user:<id>``, no
        value) deletes the published one downstream, and their history in the changelog; a later
        event of theirs publishes a new one."""
        self._queued.pop(user_id, None)
        self.vectors.write_batch([(f"user:{user_id}".encode(), None)])
        if self.changelog is not None:
            self.changelog.tombstone(user_id.encode())

    def drop_queued_users(self) -> None:
        """Forget the queued users (going back to a checkpoint: their events are read again)."""
        self._queued, self._queued_stamps = {}, []

    def publish_queued_users(self, force: bool = False) -> None:
        """Publish the queued users' vectors once the window is over (or now, with ``force``).
        Every queued user goes out at once, so one send time serves all their events' latencies."""
        if not self._queued or not (
                force or time.monotonic() - self._queued_since >= USER_PUBLISH_WINDOW_S):
            return
        queued, stamps = self._queued, self._queued_stamps
        self._queued, self._queued_stamps = {}, []
        failed = apply_isolated(list(queued), self.publish_users, "publishing user vectors")
        if failed:
            # The events stay applied (valid); only this vector is missing: say which event it was.
            self.dead_letter([(BadRecord("publish_failed", queued[user].value or b"", failure_detail(exc)),
                               queued[user]) for user, exc in failed], count_as_event=False)
            self.metrics.record_failures.labels(stage="user_vectors").inc(len(failed))
        sent_at_ms = time.time() * 1000.0
        self.metrics.observe_event_to_vector([max(0.0, (sent_at_ms - stamp) / 1000.0) for stamp in stamps])

    def deliver_refused(self) -> None:
        """Between checkpoints output is only handed to the producer, which batches it (no round
        trip per poll); what Kafka refused is sent again at once, and the loop waits for Kafka
        when more than ``MAX_UNACKNOWLEDGED_VECTORS`` are on their way. Checkpoints wait for all."""
        if self.vectors.undelivered or self.dead_letters.undelivered \
                or self.vectors.in_flight > MAX_UNACKNOWLEDGED_VECTORS:
            self.deliver()

    def publish_users(self, user_ids: list[str]) -> None:
        """Compute and send these users' vectors; raises, sending nothing, if any of them fails."""
        if not user_ids:
            return
        # Vectors and their version from the same model, handed to the producer before the lock is
        # let go: vectors of a newer version (the trainer's items) can never go out ahead of them.
        with self.learner.lock:
            learner = self.learner
            vectors = learner.user_vectors(user_ids)
            extras = user_extras(*learner_history_items(learner, user_ids, recent=self.settings.recent_items))
            version = learner.model_version
            records = encode_vectors("user", user_ids, vectors, version, time.time(), extras)
            self.version_mark.advance(version)  # durable before any vector of it goes out
            self.vectors.write_batch(records)
        self.metrics.vectors_published.labels(kind="user").inc(len(user_ids))

    def publish_items(self, ids_and_vectors, version: int) -> None:
        """Send item vectors computed from the weights of ``version``; an item whose vector cannot
        be encoded (not finite) is left out, logged and counted, and the rest go out."""
        ids, vectors = ids_and_vectors
        if not len(ids) or not self.publishes_items:
            return
        rows = dict(zip(ids, vectors))
        records: list = []
        failed = apply_isolated(list(ids), lambda batch: records.extend(
            encode_vectors("item", batch, np.stack([rows[i] for i in batch]), version, time.time())),
            "encoding item vectors")
        if failed:
            self.metrics.record_failures.labels(stage="item_vectors").inc(len(failed))
        if not records:
            return
        self.version_mark.advance(version)  # durable before any vector of it goes out
        self.vectors.write_batch(records)
        self._item_versions.update(dict.fromkeys(ids, version))
        self.metrics.vectors_published.labels(kind="item").inc(len(records))

    def published_at_version(self, item_ids, version: int) -> bool:
        """Whether a vector of any of these items already went out under ``version``."""
        versions = self._item_versions
        return any(versions.get(item_id) == version for item_id in item_ids)
