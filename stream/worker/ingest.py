"""Records in: item texts and events validated, de-duplicated and applied to the learner.

Owns what the learner's state holds of the events topic: the next offset per
partition applied (``applied``), the de-duplication window, and the records a
keepalive poll returned while an experience trained (the stash). Records below
the applied offsets are skipped whole (re-read after a rebalance or a
restart) unless the partition's log was deleted and created again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from itertools import groupby
from operator import attrgetter

from learners.records import EVENT_ID_OF, EVENT_TYPE_OF, USER_ID_OF, BadRecord, parse_event, parse_item
from stream.config import Settings
from stream.kafka.clients import SourceRecord
from stream.metrics import WorkerMetrics
from stream.worker.consumers import Consumers
from stream.worker.dead_letter_book import DeadLetterBook
from stream.worker.dedup import EventLedger, LedgerSnapshot, hash_ids
from stream.worker.handover import PartitionHandover
from stream.worker.isolation import apply_isolated, failure_detail
from stream.worker.publisher import Publisher
from stream.worker.totals import Totals

log = logging.getLogger("stream.worker")

# Record field readers for the ingest path (event ones: learners.records).
_PARTITION_OF = attrgetter("topic", "partition")
_VALUE_OF = attrgetter("value")

Partition = tuple[str, int]


class Ingest:
    def __init__(self, settings: Settings, learner, metrics: WorkerMetrics, totals: Totals,
                 consumers: Consumers, publisher: Publisher, dead_letter_book: DeadLetterBook,
                 handover: PartitionHandover, fresh_broker: bool = False) -> None:
        self.settings = settings
        # The demo's embedded broker starts empty on every run, so a restored checkpoint's offsets
        # always lie above its new logs: expected there, said once at INFO instead of an ERROR each.
        self._fresh_broker = fresh_broker
        self._fresh_broker_told = False
        self.learner = learner
        self.metrics = metrics
        self.totals = totals
        self.consumers = consumers
        self.publisher = publisher
        self.book = dead_letter_book
        self.handover = handover
        self._applied: dict[Partition, int] = {}  # next event offset per partition, applied to state
        self._item_start: dict[int, int] = {}  # where the items topic is read from (the checkpoint's)
        self._ledger = EventLedger(settings.dedup_window)
        self._stash: list[SourceRecord] = []
        self.last_poll = time.monotonic()
        # --distributed: new texts only note that item vectors moved; the group's agreed turn
        # publishes them under a version every rank shares (stream/worker/loop.py).
        self.defer_item_vectors = False
        self.item_texts_changed = False
        # Scores a sample of each batch before it is applied (stream/worker/online_eval.py); None: off.
        self.online_eval = None

    # -- state a checkpoint holds and restores --

    @property
    def applied(self) -> dict[Partition, int]:
        """The next event offset per partition applied to state (a copy)."""
        return dict(self._applied)

    def taken_over(self, tp: Partition, offset: int) -> None:
        """``tp`` was assigned to this worker, which reads it from ``offset``. Where this state's
        offset lies below (it owned the partition before, and another member has read on since),
        nothing below ``offset`` is read here again: the state moves up to it, so a checkpoint
        never commits the old offset and sends the group back. Never down: records this state
        already applied (a restart, a rewind) are read again and skipped."""
        if self._applied.get(tp, -1) < offset:
            self._applied[tp] = offset

    def apply_offset(self, tp: Partition, offset: int) -> None:
        """Mark ``tp`` applied up to ``offset``, as if its records below had been (tests, tools)."""
        self._applied[tp] = offset

    @property
    def item_start(self) -> dict[int, int]:
        return dict(self._item_start)

    def ledger_snapshot(self) -> LedgerSnapshot:
        return self._ledger.snapshot()

    def remember_ids(self, hashes) -> None:
        """Event ids (``hash_ids``) another worker applied: a repeat of one is a duplicate here too."""
        self._ledger.add_hashes(hashes)

    @property
    def ledger_size(self) -> int:
        """Event ids the de-duplication window holds now."""
        return len(self._ledger)

    def restore(self, applied: dict[Partition, int], item_start: dict[int, int], ledger: list) -> None:
        """Start over from a checkpoint's offsets and de-duplication window; the stash is dropped
        (its records are read again)."""
        self._applied = dict(applied)
        self._item_start = dict(item_start)
        self._ledger = EventLedger.from_state(self.settings.dedup_window, ledger)
        self._stash = []
        if self.consumers.items is not None:
            self.consumers.items.restart_from(self._item_start)

    # -- polls --

    def poll(self, timeout_ms: int) -> list[SourceRecord]:
        records = self.consumers.events.next_batch(timeout_ms=timeout_ms)
        self.last_poll = time.monotonic()
        return records

    def poll_into_stash(self) -> None:
        """A keepalive poll during training (fetching paused): what it returns waits in the stash."""
        self._stash.extend(self.consumers.events.next_batch(timeout_ms=0))
        self.last_poll = time.monotonic()

    def with_stash(self, records: list[SourceRecord]) -> list[SourceRecord]:
        """Stashed records first (those of partitions still assigned), then ``records``."""
        if not self._stash:
            return records
        assigned = set(self.consumers.events.assignment())  # none of partitions revoked since
        stash, self._stash = self._stash, []
        return [r for r in stash if (r.topic, r.partition) in assigned] + records

    # -- item texts --

    def read_items(self) -> int:
        """Encode the item texts that arrived (at most ``items_per_turn``) and publish the vectors
        they moved; returns how many records were read."""
        records = self.consumers.items.next_batch(timeout_ms=0, max_records=self.settings.items_per_turn)
        if not records:
            return 0
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
        self.publisher.dead_letter(bad)
        if changed and self.defer_item_vectors:
            self.item_texts_changed = True
        elif changed:
            with self.learner.lock:  # vectors and their version from the same model
                moved = self.learner.items_to_publish(self.settings.item_publish_min_change)
                version = self.learner.model_version
                if self.publisher.published_at_version(moved[0], version):
                    # New texts moved vectors that already went out under this version (an item
                    # named by events before its text came, or a text changed): one (item, version)
                    # must name one vector, so this catalogue update is a model update of its own.
                    version = self.learner.model_version = version + 1
                    self.metrics.model_version.set(version)
                self.publisher.publish_items(moved, version)  # sent under the lock: versions in order
        self.publisher.deliver()
        return len(records)

    # -- events --

    def apply_events(self, records: list[SourceRecord]) -> int:
        """Validate, de-duplicate and apply a batch; returns how many records were new to this state."""
        learner = self.learner
        bad: list[tuple[BadRecord, SourceRecord]] = []
        events, sources = [], []
        applied = self._applied
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
        hashes = hash_ids(list(map(EVENT_ID_OF, events)))
        fresh = self._ledger.add_hashes(hashes)  # one vectorised lookup
        self.handover.note_ids(hashes, sources, fresh)
        valid_by_type: Counter = Counter()
        duplicates = len(events) - sum(fresh)
        if len(events) > duplicates:
            if duplicates:
                events, sources = map(list, zip(*[(e, r) for e, r, new in zip(events, sources, fresh) if new]))
            with learner.lock:  # once per batch
                if self.online_eval is not None:  # test, then train: ranked under the vectors in force
                    self.online_eval.score(events)
                failed = apply_isolated(events, learner.observe_many, "applying events")
            if failed:
                events, sources = self._set_aside_failed(events, sources, failed, bad)
            valid_by_type.update(map(EVENT_TYPE_OF, events))
            users = list(map(USER_ID_OF, events))
            self.publisher.queue_users(users, sources)  # sent once the window is over
            self.handover.note(users, sources)
        self.publisher.dead_letter(bad)
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
        return consumed

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

    def _check_log_restarted(self, tp: Partition, offset: int) -> None:
        """Called when a fetch of ``tp`` starts at ``offset``, below the offsets already applied.
        A partition whose log now ends below them was deleted and created again (or lost data):
        its offsets start over, and skipping the new records as "already applied" would lose
        them. Read them as new from the first one fetched."""
        applied = self._applied.get(tp, 0)
        end = self.consumers.events.highwater(*tp)
        if end is not None and end < applied:
            if not self._fresh_broker:
                log.error("%s[%d] ends at offset %d, below the %d records this worker applied: the topic was "
                          "deleted and created again (or lost data); reading it as new from offset %d",
                          tp[0], tp[1], end, applied, offset)
            elif not self._fresh_broker_told:
                self._fresh_broker_told = True
                log.info("demo: the embedded broker started empty, so the checkpoint's offsets lie above its "
                         "new topics; reading them from the start")
            self._applied[tp] = offset
            self.book.forget(lambda source: (source[0], source[1]) == tp)
