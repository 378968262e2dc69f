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
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from learners.checkpoint import CheckpointStore
from learners.errors import BrokerError, RecstreamError
from learners.learner import ContinualRecommender, LearnerConfig
from learners.records import BadRecord, parse_event, parse_item
from stream.config import Settings
from stream.dedup import EventLedger
from stream.items import ItemsFollower
from stream.kafka_io import DeadLetterSink, KafkaSource, SourceRecord, VectorSink, make_producer
from stream.messages import encode_vectors
from stream.metrics import WorkerMetrics
from stream.recovery import PublishedVersionMark, Source, scan_dead_letters

log = logging.getLogger(__name__)

_LAG_EVERY_S = 5.0
# Broker trouble: waits between attempts double from the first to the last value.
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 10.0
# One attempt to reach the cluster when (re)connecting; kafka-python's default is 30 s.
_BOOTSTRAP_TIMEOUT_MS = 5000
_WATCH_IDLE_S = 15.0


class _Undelivered(RecstreamError):
    """Asked to stop while Kafka still refuses records this worker sent: no final checkpoint."""


def _set_torch_threads(settings: Settings) -> None:
    """With background training, leave one core to the loop and Kafka's I/O threads: on a
    2-core machine torch's two OpenMP threads and the loop fought for both, and an experience
    ran 3x slower than on one thread while the loop fell behind (recstream bench)."""
    threads = settings.torch_threads
    if not threads and settings.background_training:
        threads = max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") \
            else max(1, (os.cpu_count() or 2) - 1)
    if threads and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        log.info("torch intra-op threads: %d", threads)


def learner_config(settings: Settings) -> LearnerConfig:
    return LearnerConfig(
        model_path=settings.model_path(), device=settings.device, train_layers=settings.train_layers,
        max_text_tokens=settings.max_text_tokens, vector_dim=settings.vector_dim,
        history_length=settings.history_length, batch_size=settings.batch_size, negatives=settings.negatives,
        learning_rate=settings.learning_rate, ewc_lambda=settings.ewc_lambda, ewc_decay=settings.ewc_decay,
        replay_size=settings.replay_size, replay_batch=settings.replay_batch, max_users=settings.max_users,
        seed=settings.seed, train_params=settings.train_params, lora_rank=settings.lora_rank,
        lora_alpha=settings.lora_alpha, gradient_checkpointing=settings.gradient_checkpointing,
        lora_targets=tuple(t.strip() for t in settings.lora_targets.split(",") if t.strip())
        if settings.lora_targets else None)


@dataclass
class Totals:
    """The worker's own accounting (also in the checkpoint): consumed = valid + dead-lettered + duplicates."""
    consumed: int = 0
    valid: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    items: int = 0


class Worker:
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
        self._paused_for_keepalive = False
        self._stash: list[SourceRecord] = []
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
        self._has_checkpoint = self._restore()
        self.events: Optional[KafkaSource] = None
        self.items: Optional[ItemsFollower] = None
        self.producer = None

    # -- lifecycle ---------------------------------------------------------------
    def _restore(self) -> bool:
        """Load the newest complete checkpoint (learner, offsets, ledger, totals); False if none."""
        extra = self.store.load_latest(self.learner)
        if self.store.fallbacks:
            self.metrics.checkpoint_fallbacks.inc(self.store.fallbacks)
        if extra is None:
            log.info("no checkpoint in %s: starting fresh", self.settings.state_dir)
            return False
        self._offsets = {(t, int(p)): int(o) for t, p, o in extra.get("event_offsets", [])}
        self._checkpointed = dict(self._offsets)
        self._item_start = {int(p): int(o) for p, o in extra.get("item_offsets", [])}
        self.ledger = EventLedger.from_state(self.settings.dedup_window, extra.get("ledger", []))
        self.totals = Totals(**extra.get("totals", {}))
        self._dlq_done |= {(t, int(p), int(o)) for t, p, o in extra.get("dlq_done", [])}
        if "dlq_positions" in extra:
            self._dlq_positions_known = True
            for p, o in extra["dlq_positions"]:
                self._dlq_positions[int(p)] = max(self._dlq_positions.get(int(p), 0), int(o))
        # Vectors of versions above the checkpoint's may have gone out before a crash, from a
        # model that is lost now: continue above all of them, so versions never go backwards.
        published = self._version_mark.value
        if published > self.learner.model_version:
            log.info("vectors up to model version %d were published after checkpoint version %d: "
                     "continuing at version %d", published, self.learner.model_version, published + 1)
            self.learner.model_version = published + 1
        # Build the vector tables now: while an experience is in flight they are not rebuilt, and
        # the restored pending samples can start one before the first vector is published.
        self.learner.item_vectors()
        self.metrics.model_version.set(self.learner.model_version)
        log.info("resumed from checkpoint: model version %d, %d users, %d items, %d event partitions",
                 self.learner.model_version, len(self.learner.users), len(self.learner.catalogue),
                 len(self._offsets))
        return True

    def connect(self) -> None:
        """Reach Kafka (waiting, with backoff, for as long as it takes), then make sure a restart
        will not repeat what already reached the dead-letter topic. Returns early on ``stop()``."""
        s = self.settings
        if s.metrics_port and self.metrics._server is None:  # noqa: SLF001 - serve while waiting for Kafka
            port = self.metrics.serve(s.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", port)
        _set_torch_threads(s)
        if s.background_training:
            if self._trainer is None:
                # The loop polls all the time, so no keepalive polls (and never from the trainer thread).
                self._trainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recstream-trainer")
        else:
            self.learner.on_step(self._keepalive)
        if not self._retry("connect", f"reaching Kafka at {s.bootstrap_servers}", self._open_clients,
                           cleanup=self._close_clients):
            return
        if not self._retry("dlq_scan", f"reading the dead-letter topic {s.dlq_topic!r}", self._recover_dead_letters):
            return
        if not self._has_checkpoint:
            # A first checkpoint before any record is read: there is always one to go back to
            # (see _roll_back), and a restart knows where to read the dead-letter topic from.
            self._dirty_since_checkpoint = True
            self.checkpoint()
        self._connected = True

    def _open_clients(self) -> None:
        s = self.settings
        quick = {"bootstrap_timeout_ms": _BOOTSTRAP_TIMEOUT_MS}
        self.producer = make_producer(s, **quick)
        self.vectors = VectorSink(self.producer, s.vectors_topic)
        self.dead_letters = DeadLetterSink(self.producer, s.dlq_topic)
        self.events = KafkaSource.from_settings(s, on_error=self._broker_error, **quick)
        self.events.subscribe([s.events_topic], on_assigned=self._on_assigned, on_revoked=self._on_revoked,
                              on_lost=self._on_lost)
        items_consumer = KafkaConsumer(**{**s.consumer_kwargs(), **quick, "group_id": None,
                                          "client_id": s.client_id + "-items"})
        self.items = ItemsFollower(items_consumer, s.items_topic, self._item_start, on_error=self._broker_error)
        log.info("connected to Kafka at %s", s.bootstrap_servers)

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

    def _recover_dead_letters(self) -> None:
        """Read the dead-letter topic from the checkpoint's positions (all of it without a
        checkpoint) and remember the sources found there whose offsets will be read again."""
        s = self.settings
        consumer = KafkaConsumer(**{**s.consumer_kwargs(), "group_id": None, "client_id": s.client_id + "-dlq-scan",
                                    "bootstrap_timeout_ms": _BOOTSTRAP_TIMEOUT_MS})
        try:
            start = self._dlq_positions if self._dlq_positions_known else {}
            found, ends = scan_dead_letters(consumer, s.dlq_topic, start, (s.events_topic, s.items_topic))
        finally:
            consumer.close(autocommit=False)
        again = {source for source in found if not self._below_applied(source)}
        self._dlq_done |= again
        for p, o in ends.items():
            self._dlq_positions[p] = max(self._dlq_positions.get(p, 0), o)
        self._dlq_positions_known = True
        log.info("dead-letter topic %r read from %s: %d record(s) there come from offsets this worker will "
                 "read again; they will not be dead-lettered twice", s.dlq_topic, start or "the beginning", len(again))

    def _below_applied(self, source: Source) -> bool:
        """True when ``source`` lies below the offsets this worker's state already holds."""
        topic, partition, offset = source
        if topic == self.settings.events_topic:
            return offset < self._offsets.get((topic, partition), 0)
        if topic == self.settings.items_topic:
            applied = self.items.offsets if self.items is not None else self._item_start
            return offset < applied.get(partition, 0)
        return True

    def _retry(self, operation: str, what: str, attempt, cleanup=None) -> bool:
        """Call ``attempt`` until it succeeds (True) or ``stop()`` is asked for (False)."""
        delay = _RETRY_FIRST_S
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
                delay = min(2 * delay, _RETRY_MAX_S)
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
                except _Undelivered as exc:
                    # Exactly-once still holds: the last checkpoint and its committed offsets stand,
                    # and the next start redoes what came after them.
                    log.error("stopping while Kafka refuses our output (%s): no final checkpoint; the next "
                              "start resumes from the last one", exc)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self._closing = True  # leaving the group revokes partitions: already checkpointed
        if self._trainer is not None:
            self._trainer.shutdown(wait=True)  # an experience in flight finishes first
            self._trainer = None
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

    # -- one turn ----------------------------------------------------------------
    def turn(self) -> None:
        self.metrics.beat()
        self._collect_training()
        if not self._training:  # add_items runs the model: never while it trains
            self._ingest_items()
        if self.events.rejoin_pending() and self.events.assignment():
            self._before_rebalance()
        timeout = 50 if self.learner.pending else 500
        records = self.events.next_batch(timeout_ms=timeout)
        self._last_poll = time.monotonic()
        if self._rollback_reason:  # set by a rebalance callback inside that poll
            self._roll_back()
        if self._stash:  # records a keepalive poll returned during training come first
            assigned = set(self.events.assignment())  # none of partitions revoked since
            records, self._stash = [r for r in self._stash if (r.topic, r.partition) in assigned] + records, []
        self._watch_idle(records)
        if records:
            self._ingest_events(records)
        checkpoint_due = time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval_s
        if not self._training and not checkpoint_due and self._training_due() and not self.events.rejoin_pending():
            self._train()  # (not while the group waits for this member to rejoin)
        self._backpressure()
        if checkpoint_due and not self._training:  # a checkpoint waits for the experience in flight
            self.checkpoint()
        if time.monotonic() - self._last_lag >= _LAG_EVERY_S:
            self._update_lag()
        if time.monotonic() - self._last_progress >= self.settings.progress_interval_s:
            self._progress()

    def _ingest_items(self) -> None:
        records = self.items.next_batch(timeout_ms=0)
        if not records:
            return
        items, bad = [], []
        for record in records:
            parsed = parse_item(record.value)
            if isinstance(parsed, BadRecord):
                bad.append((parsed, record))
            else:
                items.append(parsed)
        changed = self.learner.add_items(items) if items else []
        self.totals.items += len(items)
        self.metrics.items_received.inc(len(items))
        self._dead_letter(bad)
        if changed:
            self._publish_items(self.learner.items_to_publish(self.settings.item_publish_min_change))
        self._deliver()
        self._dirty_since_checkpoint = True

    def _ingest_events(self, records: list[SourceRecord]) -> None:
        learner, ledger = self.learner, self.ledger
        bad: list[tuple[BadRecord, SourceRecord]] = []
        touched: dict[str, list[int]] = {}
        valid_by_type: Counter = Counter()
        duplicates = 0
        applied = self._offsets
        redelivered = 0
        self._check_log_restarted(records)
        with learner.lock:  # once per batch: the trainer thread takes its samples under it
            for record in records:
                tp = (record.topic, record.partition)
                if record.offset < applied.get(tp, 0):
                    # Already applied (re-read after a rebalance or a restart): skip it whole,
                    # so neither state nor the dead-letter topic sees it twice.
                    redelivered += 1
                    continue
                event = parse_event(record.value)
                if isinstance(event, BadRecord):
                    bad.append((event, record))
                elif not ledger.add(event.event_id):
                    duplicates += 1
                else:
                    learner.observe(event)
                    valid_by_type[event.event_type] += 1
                    touched.setdefault(event.user_id, []).append(record.timestamp_ms)
                applied[tp] = record.offset + 1
        self._dead_letter(bad)
        self._publish_users(touched)
        self._deliver()
        published_at = time.time()
        self.metrics.observe_event_to_vector(
            [max(0.0, published_at - stamp / 1000.0) for stamps in touched.values() for stamp in stamps])
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

    def _check_log_restarted(self, records: list[SourceRecord]) -> None:
        """A partition whose log now ends below the offsets already applied was deleted and
        created again (or lost data): its offsets start over, and skipping the new records as
        "already applied" would lose them. Read them as new from the first one fetched."""
        first: dict[tuple[str, int], int] = {}
        for record in records:
            first.setdefault((record.topic, record.partition), record.offset)
        for tp, offset in first.items():
            applied = self._offsets.get(tp, 0)
            if offset >= applied:
                continue
            end = self.events.highwater(*tp)
            if end is not None and end < applied:
                log.error("%s[%d] ends at offset %d, below the %d records this worker applied: the topic was "
                          "deleted and created again (or lost data); reading it as new from offset %d",
                          tp[0], tp[1], end, applied, offset)
                self._offsets[tp] = offset
                self._dlq_done = {s for s in self._dlq_done if (s[0], s[1]) != tp}

    def _dead_letter(self, bad: list[tuple[BadRecord, SourceRecord]]) -> None:
        if not bad:
            return
        fresh = []
        for parsed, record in bad:
            source = (record.topic, record.partition, record.offset)
            if source not in self._dlq_done:
                # Remembered until a checkpoint holds its offset: if this worker goes back to the
                # last checkpoint (_roll_back), the record is read again but not sent again.
                self._dlq_done.add(source)
                fresh.append((parsed, record))
            self.metrics.dead_lettered.labels(reason=parsed.reason).inc()
            if record.topic == self.settings.events_topic:
                self.totals.dead_lettered += 1
        if fresh:
            self.dead_letters.write_batch(fresh)
        if len(fresh) < len(bad):
            log.info("%d bad record(s) were already in the dead-letter topic (sent before a restart or "
                     "rollback): not sent again", len(bad) - len(fresh))
        log.debug("dead-lettered %d record(s)", len(fresh))

    def _deliver(self, *sinks) -> None:
        """Wait until everything sent to ``sinks`` (default: vectors and dead letters) is in Kafka.

        Nothing is dropped: records the producer gave up on are sent again, with a
        growing pause, for as long as the broker refuses them; a checkpoint (and so a
        commit) never happens before this returns. Asked to stop meanwhile, it raises
        ``_Undelivered`` and the worker exits without a final checkpoint.
        """
        sinks = sinks or (self.vectors, self.dead_letters)
        delay = _RETRY_FIRST_S
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
                self._broker_error("produce", exc)
            if self._stop:
                raise _Undelivered(str(errors[0]))
            log.warning("Kafka did not take our output (%s); sending again in %.1fs", errors[0], delay)
            self._sleep(delay)
            delay = min(2 * delay, _RETRY_MAX_S)
            attempts += 1
            if attempts % 3 == 0:
                # A producer can get stuck for good (e.g. its idempotent producer id is unknown to a
                # broker that lost its state): a fresh one gets a new id.
                self._renew_producer(producer)
            for sink in sinks:
                sink.resend()

    def _renew_producer(self, failing) -> None:
        with self._producer_lock:
            if self.producer is not failing:
                return  # the other thread renewed it already
            try:
                fresh = make_producer(self.settings, bootstrap_timeout_ms=_BOOTSTRAP_TIMEOUT_MS)
            except BrokerError as exc:
                self._broker_error("connect", exc)
                log.warning("could not create a new Kafka producer (%s); trying again later", exc)
                return
            log.warning("Kafka keeps refusing our output: replaced the producer; records the old one had not "
                        "delivered are sent again through the new one")
            for sink in (self.vectors, self.dead_letters):
                sink.use_producer(fresh)
            self.producer = fresh
        try:
            failing.close(timeout=0)  # its undelivered records fail now and are parked for resend()
        except Exception as exc:  # noqa: BLE001 - whatever state the old producer is in, it is given up
            log.warning("closing the old producer failed: %s", exc)

    def _publish_users(self, touched: dict) -> None:
        if not touched:
            return
        user_ids = list(touched)
        with self.learner.lock:  # vectors and their version from the same model
            vectors = self.learner.user_vectors(user_ids)
            version = self.learner.model_version
        self._version_mark.advance(version)  # durable before any vector of it goes out
        self.vectors.write_batch(encode_vectors("user", user_ids, vectors, version, time.time()))
        self.metrics.vectors_published.labels(kind="user").inc(len(user_ids))

    def _publish_items(self, ids_and_vectors, version: Optional[int] = None) -> None:
        ids, vectors = ids_and_vectors
        if not ids:
            return
        version = self.learner.model_version if version is None else version
        self._version_mark.advance(version)  # durable before any vector of it goes out
        self.vectors.write_batch(encode_vectors("item", ids, vectors, version, time.time()))
        self.metrics.vectors_published.labels(kind="item").inc(len(ids))

    # -- training ----------------------------------------------------------------
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

    # -- checkpoints and commits ---------------------------------------------------
    def checkpoint(self, in_rebalance: bool = False) -> bool:
        """Save everything applied so far, then commit exactly those offsets.

        False when no checkpoint could be written (the last one stands).
        """
        self._last_checkpoint = time.monotonic()
        if not self._dirty_since_checkpoint:
            if self._commit_pending and not self._rollback_reason:
                self._commit(in_rebalance)  # the last checkpoint stands; its commit was refused
            return True
        if self._rollback_reason:
            return False  # this state holds records of partitions given up uncommitted: never save it
        self._deliver()  # what the checkpoint covers is in Kafka before its offsets are committed
        self._dlq_done = {source for source in self._dlq_done if not self._below_applied(source)}
        dlq_positions = dict(self._dlq_positions)
        for partition, offset in self.dead_letters.next_offsets.items():
            dlq_positions[partition] = max(dlq_positions.get(partition, 0), offset)
        self._dlq_positions = dlq_positions
        extra = {
            "event_offsets": [[t, p, o] for (t, p), o in sorted(self._offsets.items())],
            "item_offsets": sorted(self.items.offsets.items()) if self.items else [],
            "ledger": self.ledger.state(),
            "totals": vars(self.totals),
            # Dead letters sent for offsets above these ones, and where a restart starts looking
            # for more in the dead-letter topic (stream/recovery.py).
            "dlq_done": sorted([t, p, o] for t, p, o in self._dlq_done),
            "dlq_positions": sorted([p, o] for p, o in dlq_positions.items()),
        }
        try:
            self.store.save(self.learner, extra)
        except (OSError, RecstreamError) as exc:
            self.metrics.checkpoint_failures.inc()
            log.error("checkpoint failed, offsets stay uncommitted: %s", exc)
            return False
        self.metrics.checkpoints.inc()
        self.metrics.last_checkpoint.set(time.time())
        self._dirty_since_checkpoint = False
        self._checkpointed = dict(self._offsets)
        self._commit(in_rebalance)
        return True

    def _commit(self, in_rebalance: bool) -> None:
        """Commit exactly the last checkpoint's offsets of the partitions this member holds."""
        assigned = set(self.events.assignment()) if self.events else set()
        offsets = {tp: o for tp, o in self._checkpointed.items() if tp in assigned}
        if in_rebalance:
            self.events.commit_nowait(offsets)  # failures are logged and counted by its callback
            self._commit_pending = False
        else:
            self._commit_pending = not self.events.commit(offsets)

    def _drain(self) -> None:
        log.info("stopping: training what is pending, checkpointing and committing")
        self._collect_training(wait=True)
        if self._rollback_reason:
            self._roll_back()
        if self.learner.pending:
            self._train()
            self._collect_training(wait=True)
        self._dirty_since_checkpoint = True
        self.checkpoint()

    def _before_rebalance(self) -> None:
        """The group asked this member to rejoin: its partitions go when it next polls. Finish the
        experience in flight, checkpoint and commit now, as a member still (the heartbeat keeps
        running meanwhile; the rebalance waits up to max.poll.interval.ms), so the revocation has
        nothing left to save and the next owners start exactly where this state ends."""
        if self._training_job is not None:
            log.info("rebalance requested: finishing the experience in flight, then checkpointing")
            self._collect_training(wait=True)
        self.checkpoint()  # the join may take a few turns: only what changed is saved again

    def _roll_back(self) -> None:
        """Go back to the last checkpoint: this state holds records of partitions that went to
        other members without a commit, and they read those records again."""
        reason, self._rollback_reason = self._rollback_reason, None
        self._collect_training(wait=True)
        self._rollback_reason = None  # a callback during that wait changes nothing: we go back anyway
        log.warning("%s: going back to the last checkpoint (records after it are read again; "
                    "nothing is applied twice)", reason)
        if not self._restore():
            raise RecstreamError(f"cannot go back to a checkpoint in {self.settings.state_dir}: there is none "
                                 "(see the checkpoint errors above); restarting from scratch is safe")
        if self.items is not None:
            self.items.restart_from(self._item_start)
        self._stash = []
        self._dirty_since_checkpoint = False
        self.metrics.pending.set(self.learner.pending)

    # -- group membership ----------------------------------------------------------
    def _on_assigned(self, partitions: list[tuple[str, int]]) -> None:
        self.metrics.rebalances.inc()
        self.metrics.partitions.set(len(self.events.assignment()))
        # No seek: the group resumes at the committed offset, which is never ahead of our
        # checkpoint unless another member moved it on (then it is right to start there);
        # records below what we already applied are skipped in _ingest_events.
        self.metrics.ready = True
        log.info("assigned %s", partitions)

    def _on_revoked(self, partitions: list[tuple[str, int]]) -> None:
        self.metrics.rebalances.inc()
        if partitions and not self._closing:
            if self._training and not (self._training_job is not None and self._training_job.done()):
                # Mid-experience state is not a consistent checkpoint (and waiting here for the
                # experience would hold up the consumer's I/O thread, heartbeats included): the
                # last checkpoint and its commit stand, the next owners read on from there, and
                # this worker goes back to that checkpoint too, or both would apply those records.
                # _before_rebalance makes this rare.
                log.info("revoked %s during training: offsets stay at the last checkpoint", partitions)
                self._rollback_reason = f"partitions {partitions} revoked mid-experience"
            else:
                log.info("revoked %s: checkpointing and committing what is done", partitions)
                try:
                    saved = self.checkpoint(in_rebalance=True)
                except _Undelivered:  # stopping while Kafka refuses our output
                    saved = False
                if not saved:  # the partitions go uncommitted: the next owners read from the last commit
                    self._rollback_reason = f"partitions {partitions} revoked without a checkpoint"
        self.metrics.partitions.set(0)

    def _on_lost(self, partitions: list[tuple[str, int]]) -> None:
        """Forced out of the group: the partitions may be another member's already, a commit would
        be refused, so go back to the last checkpoint (whose offsets were committed)."""
        self.metrics.rebalances.inc()
        self.metrics.partitions.set(0)
        if partitions and not self._closing:
            log.warning("lost %s (this member was forced out of the group)", partitions)
            self._rollback_reason = f"partitions {partitions} lost"

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
        for topic, lag in self.events.lag().items():
            self.metrics.consumer_lag.labels(topic=topic).set(lag)
