"""The long-running worker: one object owns the consumers, the producer, the
learner, commits, checkpoints and signals.

One turn of the loop: read item texts (cold-start vectors go out at once),
read a batch of events (validate, de-duplicate, apply to user state, publish
the touched users' vectors), train one experience when enough events wait,
republish the items the update moved, checkpoint when due and then commit
exactly the offsets that checkpoint covers. By default an experience trains
on a background thread while the loop goes on consuming and publishing user
vectors (an experience takes seconds on a CPU: between polls, that would be
the event -> vector latency); with ``background_training`` off it trains
between polls, keeping the group alive with paused keepalive polls.

The worker is one object split by responsibility into mixins:
``worker_checkpoints`` (checkpoints, commits, recovery and rollback),
``worker_training`` (when and where an experience trains),
``worker_membership`` (consumer-group callbacks) and ``worker_output``
(vectors, dead letters, delivery). Checkpoints are written off the loop by
``checkpoint_writer``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from itertools import groupby
from operator import attrgetter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

from kafka import KafkaConsumer
from kafka.errors import KafkaError

from learners.checkpoint import CheckpointStore
from learners.errors import BrokerError
from learners.learner import ContinualRecommender
from learners.records import EVENT_ID_OF, EVENT_TYPE_OF, USER_ID_OF, BadRecord, parse_event, parse_item
from stream import heap
from stream.checkpoint_writer import CheckpointJob, CheckpointWriter
from stream.config import Settings
from stream.dedup import EventLedger
from stream.isolation import apply_isolated, failure_detail
from stream.items import ItemsFollower
from stream.kafka_io import DeadLetterSink, KafkaSource, SourceRecord, VectorSink, make_producer
from stream.learner_setup import learner_config, set_torch_threads
from stream.metrics import WorkerMetrics
from stream.origin import ForeignCheckpointError, StreamOrigin, check_checkpoint_origin, fetch_cluster_id
from stream.recovery import PublishedVersionMark, Source
from stream.worker_checkpoints import CheckpointMixin, Totals
from stream.worker_membership import MembershipMixin
from stream.worker_output import BOOTSTRAP_TIMEOUT_MS, RETRY_FIRST_S, RETRY_MAX_S, OutputMixin, Undelivered
from stream.worker_training import TrainingMixin

log = logging.getLogger(__name__)

_LAG_EVERY_S = 5.0
# Record field readers for the ingest path (event ones: learners.records).
_PARTITION_OF = attrgetter("topic", "partition")
_VALUE_OF = attrgetter("value")
_WATCH_IDLE_S = 15.0

__all__ = ["Worker", "Totals", "learner_config"]


class Worker(CheckpointMixin, TrainingMixin, MembershipMixin, OutputMixin):
    def __init__(self, settings: Settings, *, learner: Optional[ContinualRecommender] = None,
                 metrics: Optional[WorkerMetrics] = None) -> None:
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.learner = learner or ContinualRecommender(learner_config(settings))
        self.metrics.replay_capacity.set(settings.replay_size)
        self.store = CheckpointStore(settings.state_dir)
        self.ledger = EventLedger(settings.dedup_window)
        self.totals = Totals()
        self._offsets: dict[tuple[str, int], int] = {}  # next event offset per partition, applied to state
        self._checkpointed: dict[tuple[str, int], int] = {}
        self._item_start: dict[int, int] = {}
        self._stop = False
        self._closing = False
        self._training = False
        # Background training (settings.background_training): experiences run on this one
        # thread while the loop keeps consuming and publishing user vectors; an experience
        # takes seconds on a CPU, which would otherwise be the event -> vector latency.
        # Only the loop thread sets _training; it hands work over in _train() and takes
        # the outcome back in _collect_training(). The learner's own lock guards what both
        # threads touch (see ContinualRecommender.__init__).
        self._trainer: Optional[ThreadPoolExecutor] = None
        self._training_job: Optional[Future] = None
        # Checkpoints are prepared on that same thread (on the writer's without background
        # training) and written on the writer's: see stream/checkpoint_writer.py.
        # _checkpoint_job is the checkpoint in flight.
        self._writer_pool: Optional[ThreadPoolExecutor] = None
        self._writer: Optional[CheckpointWriter] = None
        self._checkpoint_job: Optional[CheckpointJob] = None
        self._paused_for_keepalive = False
        self._stash: list[SourceRecord] = []
        self._unpublished: dict[str, None] = {}  # users whose vectors wait for the publish window (in order)
        self._unpublished_stamps: list[int] = []  # their events' Kafka timestamps (ms)
        self._unpublished_since = 0.0
        self._last_poll = time.monotonic()
        self._last_train = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._last_lag = 0.0
        self._last_progress = time.monotonic()
        self._progress_consumed = 0
        self._dirty_since_checkpoint = False
        # Exactly-once across restarts (see stream/recovery.py). _dlq_done: sources already in
        # the dead-letter topic whose offsets may be read again (never sent twice);
        # _dlq_positions: where a restart starts reading the dead-letter topic;
        # _version_mark: the highest model version vectors may have gone out with.
        self._dlq_done: set[Source] = set()
        self._dlq_positions: dict[int, int] = {}
        self._dlq_positions_known = False
        self._version_mark = PublishedVersionMark(settings.state_dir)
        # Set when this worker's state holds effects of partitions it gave up without a
        # checkpoint (revoked mid-experience, or forced out of the group): the next turn
        # goes back to the last checkpoint instead of writing one.
        self._rollback_reason: Optional[str] = None
        self._connected = False
        self._commit_pending = False  # the last checkpoint's commit was refused: try again
        self._producer_lock = threading.Lock()  # _renew_producer from the loop or the trainer thread
        self._idle_since: Optional[float] = None
        self._last_topic_check = 0.0
        self._first_applied_at: Optional[float] = None  # when this process first applied a record
        self._events_lag = 0  # records behind the log ends, as of the last lag update
        self._last_poll_full = False  # the last poll returned all it may: more wait (known before the lag)
        self._last_items_at = float("-inf")  # when item texts last arrived
        self._checkpointed_since_start = False  # a checkpoint holding this process's own events is durable
        self._item_versions: dict[str, int] = {}  # item id -> model version its last vector went out with
        self._saved_origin: Optional[dict] = None  # the stream the restored checkpoint was read from
        self._origin: Optional[StreamOrigin] = None  # the stream this worker reads, once connected
        self._has_checkpoint = self._restore()
        self._progress_consumed = self.totals.consumed  # the first rate counts this process's records only
        self.events: Optional[KafkaSource] = None
        self.items: Optional[ItemsFollower] = None
        self.producer = None

    def connect(self) -> None:
        """Reach Kafka (waiting, with backoff, for as long as it takes), then make sure a restart
        will not repeat what already reached the dead-letter topic. Returns early on ``stop()``."""
        s = self.settings
        if s.metrics_port and self.metrics._server is None:  # noqa: SLF001 - serve while waiting for Kafka
            port = self.metrics.serve(s.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", port)
        set_torch_threads(s)
        if s.background_training:
            if self._trainer is None:
                # The loop polls all the time, so no keepalive polls (and never from the trainer thread).
                self._trainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recstream-trainer")
        else:
            self.learner.on_step(self._keepalive)
        self._checkpoint_writer()
        if not self._retry("connect", f"reaching Kafka at {s.bootstrap_servers}", self._open_clients,
                           cleanup=self._close_clients):
            return
        try:
            check_checkpoint_origin(self._origin, self._saved_origin, s.state_dir)
        except ForeignCheckpointError:
            self.close()
            raise
        if not self._retry("dlq_scan", f"reading the dead-letter topic {s.dlq_topic!r}", self._recover_dead_letters):
            return
        if not self._has_checkpoint:
            # A first checkpoint before any record is read: there is always one to go back to
            # (see _roll_back), and a restart knows where to read the dead-letter topic from.
            self._dirty_since_checkpoint = True
            self.checkpoint()
        self._connected = True
        # The model, the clients and the libraries stay for the whole run: a full garbage
        # collection would walk them all again each time (0.35 s here, GIL held; stream/heap.py).
        log.info("%d startup objects exempt from garbage collection", heap.freeze_startup_objects())

    def _open_clients(self) -> None:
        s = self.settings
        quick = {"bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS}
        self.producer = make_producer(s, **quick)
        self.vectors = VectorSink(self.producer, s.vectors_topic)
        self.dead_letters = DeadLetterSink(self.producer, s.dlq_topic)
        self.events = KafkaSource.from_settings(s, on_error=self._broker_error, **quick)
        self.events.subscribe([s.events_topic], on_assigned=self._on_assigned, on_revoked=self._on_revoked,
                              on_lost=self._on_lost)
        items_consumer = KafkaConsumer(**s.reader_kwargs("items"), **quick)
        self.items = ItemsFollower(items_consumer, s.items_topic, self._item_start, on_error=self._broker_error)
        self._origin = StreamOrigin.of(s, fetch_cluster_id(s, BOOTSTRAP_TIMEOUT_MS))
        log.info("connected to Kafka at %s (cluster %s)", s.bootstrap_servers, self._origin.cluster_id)

    def _close_clients(self) -> None:
        for part in (self.events, self.items):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001 - half-built clients of a failed attempt
                    pass
        if self.producer is not None:
            try:
                self.producer.close(timeout=1)
            except Exception:  # noqa: BLE001
                pass
        self.events = self.items = self.producer = None

    def _retry(self, operation: str, what: str, attempt, cleanup=None) -> bool:
        """Call ``attempt`` until it succeeds (True) or ``stop()`` is asked for (False)."""
        delay = RETRY_FIRST_S
        while not self._stop:
            try:
                attempt()
                return True
            except (BrokerError, KafkaError, OSError) as exc:
                if cleanup is not None:
                    cleanup()
                self._broker_error(operation, exc)
                log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
                self._sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
        return False

    def _sleep(self, seconds: float) -> None:
        """Wait without spinning, staying responsive to ``stop()`` and keeping /healthz fresh."""
        deadline = time.monotonic() + seconds
        while not self._stop:
            self.metrics.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.25, left))

    def stop(self) -> None:
        """Ask the loop to finish the turn in hand, checkpoint, commit and return."""
        self._stop = True

    def run(self) -> int:
        if not self._connected:
            self.connect()
        try:
            if self._connected:
                try:
                    while not self._stop:
                        self.turn()
                    self._drain()
                except Undelivered as exc:
                    # Exactly-once still holds: the last checkpoint and its committed offsets stand,
                    # and the next start redoes what came after them.
                    log.error("stopping while Kafka refuses our output (%s): no final checkpoint; the next "
                              "start resumes from the last one", exc)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self._closing = True  # leaving the group revokes partitions: already checkpointed
        for pool in (self._trainer, self._writer_pool):
            if pool is not None:
                pool.shutdown(wait=True)  # an experience or a checkpoint write in flight finishes first
        self._trainer = self._writer_pool = None
        self._writer = None
        heap.thaw()
        for part in (self.events, self.items):
            if part is not None:
                part.close()
        if self.producer is not None:
            try:
                self.producer.close(timeout=10)
            except KafkaError as exc:
                log.warning("closing the producer failed: %s", exc)
            self.producer = None
        self.metrics.close()

    def turn(self) -> None:
        self.metrics.beat()
        self._collect_training()
        self._collect_checkpoint()
        if not self._busy:  # add_items runs the model: never while it trains or is being prepared
            self._ingest_items()
        if self.events.rejoin_pending() and self.events.assignment():
            self._before_rebalance()
        timeout = 50 if self.learner.pending or self._unpublished else 500
        records = self.events.next_batch(timeout_ms=timeout)
        self._last_poll = time.monotonic()
        self._last_poll_full = len(records) >= self.settings.max_poll_records
        if self._rollback_reason:  # set by a rebalance callback inside that poll
            self._roll_back()
        if self._stash:  # records a keepalive poll returned during training come first
            assigned = set(self.events.assignment())  # none of partitions revoked since
            records, self._stash = [r for r in self._stash if (r.topic, r.partition) in assigned] + records, []
        self._watch_idle(records)
        if records:
            self._ingest_events(records)
        self._publish_queued_users()
        self._deliver_refused()
        checkpoint_due = self._checkpoint_due()
        if not self._busy and not checkpoint_due and self._training_due() and not self.events.rejoin_pending():
            self._train()  # (not while the group waits for this member to rejoin)
        self._backpressure()
        if checkpoint_due and not self._busy:  # a checkpoint waits for the experience in flight
            self.checkpoint(wait=False)  # written off the loop, committed by a later turn
        if time.monotonic() - self._last_lag >= _LAG_EVERY_S:
            self._update_lag()
        if time.monotonic() - self._last_progress >= self.settings.progress_interval_s:
            self._progress()

    def _checkpoint_due(self) -> bool:
        """Every ``checkpoint_interval_s``, every ``catch_up_checkpoint_s`` while behind, and the first
        one ``first_checkpoint_s`` after the first records applied: a worker killed sooner than the
        interval, over and over, still commits what it did."""
        now = time.monotonic()
        since = now - self._last_checkpoint
        if since >= self.settings.checkpoint_interval_s:
            return True
        if self._dirty_since_checkpoint and since >= self.settings.catch_up_checkpoint_s and self._behind(now):
            return True
        first = self._first_applied_at
        return first is not None and not self._checkpointed_since_start \
            and now - first >= self.settings.first_checkpoint_s

    def _behind(self, now: float) -> bool:
        """Catching up: events wait in the log, or item texts arrived within the catch-up interval."""
        return (self._events_lag > 0 or self._last_poll_full
                or now - self._last_items_at < self.settings.catch_up_checkpoint_s)

    def _checkpoint_writer(self) -> CheckpointWriter:
        """The writer: checkpoints prepared on the trainer thread (no experience runs meanwhile)
        and written on a thread of their own; without background training, both on that one."""
        if self._writer is None:
            self._writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recstream-checkpoint")
            self._writer = CheckpointWriter(self.store, self.learner, self._trainer or self._writer_pool,
                                            self._writer_pool)
        return self._writer

    @property
    def _busy(self) -> bool:
        """An experience is training or a checkpoint is being prepared: the model must stay as it is."""
        job = self._checkpoint_job
        return self._training or (job is not None and job.holds_learner())

    def _ingest_items(self) -> None:
        records = self.items.next_batch(timeout_ms=0, max_records=self.settings.items_per_turn)
        if not records:
            return
        self._last_items_at = time.monotonic()
        items, bad = [], []
        source_of: dict[int, SourceRecord] = {}  # id(item) -> its record, for a dead letter
        for record in records:
            parsed = parse_item(record.value)
            if isinstance(parsed, BadRecord):
                bad.append((parsed, record))
            else:
                items.append(parsed)
                source_of[id(parsed)] = record
        changed: list[str] = []
        failed = apply_isolated(items, lambda batch: changed.extend(self.learner.add_items(batch)), "encoding items")
        if failed:
            bad.extend((BadRecord("item_failed", source_of[id(item)].value or b"", failure_detail(exc)),
                        source_of[id(item)]) for item, exc in failed)
            self.metrics.record_failures.labels(stage="items").inc(len(failed))
        applied = len(items) - len(failed)
        self.totals.items += applied
        self.metrics.items_received.inc(applied)
        self._dead_letter(bad)
        if self._first_applied_at is None:
            self._first_applied_at = time.monotonic()  # encoded texts are progress a checkpoint keeps too
        if changed:
            with self.learner.lock:  # vectors and their version from the same model
                moved = self.learner.items_to_publish(self.settings.item_publish_min_change)
                version = self.learner.model_version
                if self._published_at_version(moved[0], version):
                    # New texts moved vectors that already went out under this version (an item
                    # named by events before its text came, or a text changed): one (item, version)
                    # must name one vector, so this catalogue update is a model update of its own.
                    version = self.learner.model_version = version + 1
                    self.metrics.model_version.set(version)
            self._publish_items(moved, version)
        self._deliver()
        self._dirty_since_checkpoint = True

    def _ingest_events(self, records: list[SourceRecord]) -> None:
        learner = self.learner
        bad: list[tuple[BadRecord, SourceRecord]] = []
        events, sources = [], []
        applied = self._offsets
        redelivered = 0
        # Per partition run, not per record: offsets ascend within one, so only a run that starts
        # below the applied offset holds records to skip. Parsing happens outside the learner's
        # lock (the trainer thread takes its samples under it).
        for tp, run in groupby(records, _PARTITION_OF):
            run = list(run)
            start = applied.get(tp, 0)
            if run[0].offset < start:
                self._check_log_restarted(tp, run[0].offset)
                start = applied.get(tp, 0)
                # Already applied (re-read after a rebalance or a restart): skip it whole,
                # so neither state nor the dead-letter topic sees it twice.
                kept = [record for record in run if record.offset >= start]
                redelivered += len(run) - len(kept)
                if not kept:
                    continue
                run = kept
            for record, event in zip(run, map(parse_event, map(_VALUE_OF, run))):
                if event.__class__ is BadRecord:
                    bad.append((event, record))
                else:
                    events.append(event)
                    sources.append(record)
            applied[tp] = run[-1].offset + 1
        fresh = self.ledger.add_many(list(map(EVENT_ID_OF, events)))  # one vectorised lookup
        valid_by_type: Counter = Counter()
        duplicates = len(events) - sum(fresh)
        if len(events) > duplicates:
            if duplicates:
                events, sources = map(list, zip(*[(e, r) for e, r, new in zip(events, sources, fresh) if new]))
            with learner.lock:  # once per batch
                failed = apply_isolated(events, learner.observe_many, "applying events")
            if failed:
                events, sources = self._set_aside_failed(events, sources, failed, bad)
            valid_by_type.update(map(EVENT_TYPE_OF, events))
            self._queue_users(list(map(USER_ID_OF, events)), sources)  # published once the window is over
        self._dead_letter(bad)
        valid = sum(valid_by_type.values())
        consumed = len(records) - redelivered
        self.totals.consumed += consumed
        self.totals.valid += valid
        self.totals.duplicates += duplicates
        self.metrics.events_consumed.inc(consumed)
        for event_type, n in valid_by_type.items():
            self.metrics.events_valid.labels(event_type=event_type).inc(n)
        self.metrics.duplicates.inc(duplicates)
        self.metrics.pending.set(learner.pending)
        self._dirty_since_checkpoint = True
        if self._first_applied_at is None and consumed:
            self._first_applied_at = time.monotonic()

    def _set_aside_failed(self, events: list, sources: list, failed: list, bad: list) -> tuple[list, list]:
        """Events the learner could not apply, one by one: dead letters instead of valid events."""
        failed_ids = {id(event): exc for event, exc in failed}
        kept_events, kept_sources = [], []
        for event, record in zip(events, sources):
            exc = failed_ids.get(id(event))
            if exc is None:
                kept_events.append(event)
                kept_sources.append(record)
            else:
                bad.append((BadRecord("apply_failed", record.value or b"", failure_detail(exc)), record))
        self.metrics.record_failures.labels(stage="events").inc(len(failed))
        return kept_events, kept_sources

    def _drain(self) -> None:
        log.info("stopping: training what is pending, checkpointing and committing")
        self._collect_training(wait=True)
        self._collect_checkpoint(wait=True)
        if self._rollback_reason:
            self._roll_back()
        if self.learner.pending:
            self._train()
            self._collect_training(wait=True)
        self._dirty_since_checkpoint = True
        self.checkpoint()

    def _broker_error(self, operation: str, exc: BaseException) -> None:
        self.metrics.broker_errors.labels(operation=operation).inc()

    def _watch_idle(self, records: list) -> None:
        """When nothing has arrived for a while, say clearly why (and count it if Kafka does not answer)."""
        now = time.monotonic()
        if records or self._idle_since is None:
            self._idle_since = now
            return
        idle = now - self._idle_since
        if idle < _WATCH_IDLE_S or now - self._last_topic_check < _WATCH_IDLE_S:
            return
        self._last_topic_check = now
        topic = self.settings.events_topic
        exists = self.events.topic_exists(topic)  # fresh metadata: also lets the group see a new topic
        if exists is None:
            log.warning("no records for %.0fs and Kafka at %s does not answer: waiting for it",
                        idle, self.settings.bootstrap_servers)
        elif not exists:
            log.warning("events topic %r does not exist (yet): waiting for it", topic)
        elif not self.events.assignment():
            log.info("no partition of %r assigned for %.0fs (group %r rebalancing, or every partition taken "
                     "by other members): waiting", topic, idle, self.settings.group_id)

    def _progress(self) -> None:
        now = time.monotonic()
        rate = (self.totals.consumed - self._progress_consumed) / max(now - self._last_progress, 1e-9)
        self._last_progress, self._progress_consumed = now, self.totals.consumed
        m = self.metrics
        log.info("%.0f events/s | consumed %d (valid %d, dead-lettered %d, duplicates %d) | model v%d "
                 "| loss %.3f | users %d items %d | pending %d", rate, self.totals.consumed, self.totals.valid,
                 self.totals.dead_lettered, self.totals.duplicates, self.learner.model_version,
                 m.train_loss._value.get(), len(self.learner.users), len(self.learner.catalogue),  # noqa: SLF001
                 self.learner.pending)

    def _update_lag(self) -> None:
        self._last_lag = time.monotonic()
        lags = self.events.lag()
        for topic, lag in lags.items():
            self.metrics.consumer_lag.labels(topic=topic).set(lag)
        self._events_lag = sum(lags.values())
