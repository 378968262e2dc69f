"""The long-running worker: one object owns the consumers, the producer, the
learner, commits, checkpoints and signals.

One turn of the loop: read item texts (cold-start vectors go out at once),
read a batch of events (validate, de-duplicate, apply to user state, publish
the touched users' vectors), train one experience when enough events wait,
republish the items the update moved, checkpoint when due and then commit
exactly the offsets that checkpoint covers. Training runs in short
experiences between polls, so the consumer never misses its poll interval.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from kafka import KafkaConsumer

from learners.checkpoint import CheckpointStore
from learners.errors import RecstreamError
from learners.learner import ContinualRecommender, LearnerConfig
from learners.records import BadRecord, parse_event, parse_item
from stream.config import Settings
from stream.dedup import EventLedger
from stream.items import ItemsFollower
from stream.kafka_io import DeadLetterSink, KafkaSource, SourceRecord, VectorSink, make_producer
from stream.messages import encode_vectors
from stream.metrics import WorkerMetrics

log = logging.getLogger(__name__)

_LAG_EVERY_S = 5.0


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
        self._paused_for_keepalive = False
        self._stash: list[SourceRecord] = []
        self._last_poll = time.monotonic()
        self._last_train = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._last_lag = 0.0
        self._last_progress = time.monotonic()
        self._progress_consumed = 0
        self._dirty_since_checkpoint = False
        self._restore()
        self.events: Optional[KafkaSource] = None
        self.items: Optional[ItemsFollower] = None
        self.producer = None

    # -- lifecycle ---------------------------------------------------------------
    def _restore(self) -> None:
        extra = self.store.load_latest(self.learner)
        if self.store.fallbacks:
            self.metrics.checkpoint_fallbacks.inc(self.store.fallbacks)
        if extra is None:
            log.info("no checkpoint in %s: starting fresh", self.settings.state_dir)
            return
        self._offsets = {(t, int(p)): int(o) for t, p, o in extra.get("event_offsets", [])}
        self._checkpointed = dict(self._offsets)
        self._item_start = {int(p): int(o) for p, o in extra.get("item_offsets", [])}
        self.ledger = EventLedger.from_state(self.settings.dedup_window, extra.get("ledger", []))
        self.totals = Totals(**extra.get("totals", {}))
        self.metrics.model_version.set(self.learner.model_version)
        log.info("resumed from checkpoint: model version %d, %d users, %d items, %d event partitions",
                 self.learner.model_version, len(self.learner.users), len(self.learner.catalogue),
                 len(self._offsets))

    def connect(self) -> None:
        s = self.settings
        self.learner.on_step(self._keepalive)
        self.producer = make_producer(s)
        self.vectors = VectorSink(self.producer, s.vectors_topic)
        self.dead_letters = DeadLetterSink(self.producer, s.dlq_topic)
        self.events = KafkaSource.from_settings(s, on_error=self._broker_error)
        self.events.subscribe([s.events_topic], on_assigned=self._on_assigned, on_revoked=self._on_revoked)
        items_consumer = KafkaConsumer(**{**s.consumer_kwargs(), "group_id": None, "client_id": s.client_id + "-items"})
        self.items = ItemsFollower(items_consumer, s.items_topic, self._item_start, on_error=self._broker_error)
        if s.metrics_port:
            port = self.metrics.serve(s.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", port)

    def stop(self) -> None:
        """Ask the loop to finish the turn in hand, checkpoint, commit and return."""
        self._stop = True

    def run(self) -> int:
        if self.events is None:
            self.connect()
        try:
            while not self._stop:
                self.turn()
            self._drain()
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self._closing = True  # leaving the group revokes partitions: already checkpointed
        for part in (self.events, self.items):
            if part is not None:
                part.close()
        if self.producer is not None:
            self.producer.close(timeout=10)
            self.producer = None
        self.metrics.close()

    # -- one turn ----------------------------------------------------------------
    def turn(self) -> None:
        self.metrics.beat()
        self._ingest_items()
        timeout = 50 if self.learner.pending else 500
        records = self.events.next_batch(timeout_ms=timeout)
        self._last_poll = time.monotonic()
        if self._stash:  # records a keepalive poll returned during training come first
            records, self._stash = self._stash + records, []
        if records:
            self._ingest_events(records)
        if self._training_due():
            self._train()
        self._backpressure()
        if time.monotonic() - self._last_checkpoint >= self.settings.checkpoint_interval_s:
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
        self.producer.flush()
        self._dirty_since_checkpoint = True

    def _ingest_events(self, records: list[SourceRecord]) -> None:
        learner, ledger = self.learner, self.ledger
        bad: list[tuple[BadRecord, SourceRecord]] = []
        touched: dict[str, list[int]] = {}
        valid_by_type: Counter = Counter()
        duplicates = 0
        applied = self._offsets
        redelivered = 0
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
        self.producer.flush()
        published_at = time.time()
        for stamps in touched.values():
            for stamp in stamps:
                self.metrics.event_to_vector.observe(max(0.0, published_at - stamp / 1000.0))
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

    def _dead_letter(self, bad: list[tuple[BadRecord, SourceRecord]]) -> None:
        if not bad:
            return
        self.dead_letters.write_batch(bad)
        for parsed, record in bad:
            self.metrics.dead_lettered.labels(reason=parsed.reason).inc()
            if record.topic == self.settings.events_topic:
                self.totals.dead_lettered += 1
        log.debug("dead-lettered %d record(s)", len(bad))

    def _publish_users(self, touched: dict) -> None:
        if not touched:
            return
        user_ids = list(touched)
        vectors = self.learner.user_vectors(user_ids)
        self.vectors.write_batch(encode_vectors("user", user_ids, vectors, self.learner.model_version, time.time()))
        self.metrics.vectors_published.labels(kind="user").inc(len(user_ids))

    def _publish_items(self, ids_and_vectors) -> None:
        ids, vectors = ids_and_vectors
        if not ids:
            return
        self.vectors.write_batch(encode_vectors("item", ids, vectors, self.learner.model_version, time.time()))
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
            shed = self.learner.shed_pending(self.settings.max_pending_events)
            if shed:
                self.metrics.train_shed.inc(shed)
        self._training = True
        try:
            report = self.learner.learn(max_samples=self.settings.experience_size)
        finally:
            self._training = False
            self._end_keepalive()
        self._last_train = time.monotonic()
        if report is None:
            return
        updated_at = time.monotonic()
        self._publish_items(self.learner.items_to_publish(self.settings.item_publish_min_change))
        self.producer.flush()
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
    def checkpoint(self, in_rebalance: bool = False) -> None:
        """Save everything applied so far, then commit exactly those offsets."""
        self._last_checkpoint = time.monotonic()
        if not self._dirty_since_checkpoint:
            return
        extra = {
            "event_offsets": [[t, p, o] for (t, p), o in sorted(self._offsets.items())],
            "item_offsets": sorted(self.items.offsets.items()) if self.items else [],
            "ledger": self.ledger.state(),
            "totals": vars(self.totals),
        }
        try:
            self.producer.flush()
            self.store.save(self.learner, extra)
        except (OSError, RecstreamError) as exc:
            self.metrics.checkpoint_failures.inc()
            log.error("checkpoint failed, offsets stay uncommitted: %s", exc)
            return
        self.metrics.checkpoints.inc()
        self.metrics.last_checkpoint.set(time.time())
        self._dirty_since_checkpoint = False
        self._checkpointed = dict(self._offsets)
        assigned = set(self.events.assignment()) if self.events else set()
        offsets = {tp: o for tp, o in self._checkpointed.items() if tp in assigned}
        if in_rebalance:
            self.events.commit_nowait(offsets)
        else:
            self.events.commit(offsets)

    def _drain(self) -> None:
        log.info("stopping: training what is pending, checkpointing and committing")
        if self.learner.pending:
            self._train()
        self._dirty_since_checkpoint = True
        self.checkpoint()

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
            if self._training:
                # Mid-experience state is not a consistent checkpoint: leave the last one
                # (and its committed offsets) in force; the next owner re-reads from there.
                log.info("revoked %s during training: offsets stay at the last checkpoint", partitions)
            else:
                log.info("revoked %s: checkpointing and committing what is done", partitions)
                self._dirty_since_checkpoint = True
                self.checkpoint(in_rebalance=True)
        self.metrics.partitions.set(0)

    def _broker_error(self, operation: str, exc: BaseException) -> None:
        self.metrics.broker_errors.labels(operation=operation).inc()

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
