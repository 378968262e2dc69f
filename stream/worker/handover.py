"""User histories that follow their events partition from worker to worker (stream/kafka/changelog.py).

Owns which users changed since the last checkpoint, per events partition,
the newest event ids applied from each partition (``RecentIds``), and the
partitions newly assigned whose users' histories are still to be read. At
every checkpoint the changes are taken with its snapshot (``take``); the
checkpoint writer thread sends the changed users' histories, read from the
snapshot's copy of the histories, and waits for Kafka to take them before the
checkpoint can be committed (``send``), while the loop goes on. A partition
assigned to this worker is held (nothing fetched) until ``settle`` has learnt
the offset this worker reads it from and, with a changelog, adopted its users'
histories as of that offset, unless this worker's own state already ends
there or past it (it owned the partition last, or restarted from its own
checkpoint, perhaps one whose commit had not landed): then there is nothing to
read. The worker's applied offset moves up to that start (``Ingest.taken_over``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Optional

import numpy as np
from kafka import KafkaConsumer

from learners.state.users import histories_by_id
from stream.config import Settings
from stream.kafka.changelog import LEDGER_KEY, choose, encode_ledger, encode_user_state, read_partition
from stream.kafka.clients import KafkaSource, SourceRecord
from stream.kafka.errors import BrokerError
from stream.kafka.sinks import ChangelogSink
from stream.metrics import WorkerMetrics
from stream.worker.publisher import BOOTSTRAP_TIMEOUT_MS, Publisher

log = logging.getLogger("stream.worker")

Partition = tuple[str, int]
_PARTITION_OF = attrgetter("partition")

# Event ids of a partition handed over with it: a repeat delivery (a producer retry) comes
# within seconds of the original, far fewer events than this apart on one partition.
RECENT_IDS = 16_384


class RecentIds:
    """The newest ``capacity`` event id hashes of one partition, in a ring."""

    def __init__(self, capacity: int = RECENT_IDS) -> None:
        self._ring = np.zeros(capacity, np.int64)
        self._written = 0

    def extend(self, hashes: np.ndarray) -> None:
        capacity = len(self._ring)
        hashes = hashes[-capacity:]
        places = (self._written + np.arange(len(hashes))) % capacity
        self._ring[places] = hashes
        self._written += len(hashes)

    def oldest_first(self) -> np.ndarray:
        capacity = len(self._ring)
        kept = min(self._written, capacity)
        return self._ring[(self._written - kept + np.arange(kept)) % capacity]


@dataclass
class ChangelogBatch:
    """What one checkpoint writes to the changelog, per events partition: the offset its states hold
    events up to, the users whose history changed, and the recent event ids (where new ones came)."""
    sink: ChangelogSink
    through: dict[int, int] = field(default_factory=dict)
    users: dict[int, set[str]] = field(default_factory=dict)
    ids: dict[int, np.ndarray] = field(default_factory=dict)


class PartitionHandover:
    def __init__(self, settings: Settings, learner, metrics: WorkerMetrics, publisher: Publisher) -> None:
        self.settings = settings
        self.learner = learner
        self.metrics = metrics
        self.publisher = publisher
        self._partitions = 0  # the changelog's partition count; 0: no changelog, nothing moves
        self._changed: dict[int, set[str]] = {}  # events partition -> users whose history changed
        self._recent: dict[int, RecentIds] = {}  # events partition -> its newest event ids
        self._recent_changed: set[int] = set()
        self._to_adopt: set[Partition] = set()
        self._reader: Optional[KafkaConsumer] = None
        self._too_few_told = False

    def open(self, events: KafkaSource) -> None:
        """Once connected: use the changelog topic if it exists (said either way)."""
        topic = self.settings.changelog_topic
        partitions = len(events.partitions(topic)) if topic else 0
        self._partitions = partitions
        if partitions:
            self.publisher.open_changelog(partitions)
            log.info("user histories follow their events partitions through %r (%d partitions)", topic, partitions)
        else:
            log.warning("changelog topic %r does not exist: user histories stay with the worker that built them, so "
                        "a partition that moves to another worker starts there with none. Create it compacted, with "
                        "as many partitions as %r", topic, self.settings.events_topic)

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close(autocommit=False)

    # -- this worker's users, out --

    def note(self, user_ids: list[str], sources: list[SourceRecord]) -> None:
        """These users' histories changed through the events of these records (ingest path)."""
        if not self._partitions:
            return
        changed = self._changed
        for user_id, partition in zip(user_ids, map(_PARTITION_OF, sources)):
            users = changed.get(partition)
            if users is None:
                users = changed[partition] = set()
            users.add(user_id)

    def note_ids(self, hashes: np.ndarray, sources: list[SourceRecord], fresh: list[bool]) -> None:
        """The event ids (``hash_ids``) of these records that the ledger took as new."""
        if not self._partitions or not len(hashes):
            return
        keep = np.asarray(fresh, bool)
        parts = np.fromiter(map(_PARTITION_OF, sources), np.int64, len(sources))[keep]
        hashes = hashes[keep]
        for partition in np.unique(parts).tolist():
            recent = self._recent.get(partition)
            if recent is None:
                recent = self._recent[partition] = RecentIds()
            recent.extend(hashes[parts == partition])
            self._recent_changed.add(partition)

    def forget_changes(self) -> None:
        """Going back to a checkpoint: the changes after it are read again and noted again (the
        recent ids stay: the ledger, restored too, would take their repeats as duplicates)."""
        self._changed = {}

    def take(self, applied: dict[Partition, int]) -> Optional[ChangelogBatch]:
        """Loop thread, at a checkpoint's snapshot: what changed since the last one, as of these
        applied offsets (None: nothing to write). ``send`` writes it off the loop."""
        changed, self._changed = self._changed, {}
        ids_changed, self._recent_changed = self._recent_changed, set()
        sink = self.publisher.changelog
        if sink is None or not (changed or ids_changed):
            return None
        topic = self.settings.events_topic
        batch = ChangelogBatch(sink)
        for partition in sorted(changed.keys() | ids_changed):
            through = applied.get((topic, partition))
            if through is None:
                continue
            if partition >= sink.partitions:
                self._say_too_few(partition + 1)
                continue
            batch.through[partition] = through
            batch.users[partition] = changed.get(partition, set())
            if partition in ids_changed:
                batch.ids[partition] = self._recent[partition].oldest_first()
        return batch

    def send(self, batch: ChangelogBatch, users_state: dict, item_ids: list) -> int:
        """Checkpoint writer thread: the batch's histories, read from the checkpoint's copy of the
        user histories (``users_state``, ``item_ids``), to the changelog, waited for. Raises
        ``BrokerError`` when Kafka did not take them all (the checkpoint fails, ``give_back``)."""
        written = 0
        for partition, through in batch.through.items():
            histories = histories_by_id(users_state, item_ids, batch.users[partition])
            records = [(user_id.encode(), encode_user_state(through, items, weights))
                       for user_id, (items, weights) in histories.items()]
            if partition in batch.ids:
                records.append((LEDGER_KEY, encode_ledger(through, batch.ids[partition])))
            batch.sink.write_batch(partition, records)
            written += len(histories)
        batch.sink.flush(timeout=60.0)
        self.metrics.changelog_records.inc(written)
        return written

    def send_from(self, batch: ChangelogBatch, snapshot) -> int:
        """``send`` reading a checkpoint's ``LearnerSnapshot`` (its copies of the histories and ids)."""
        return self.send(batch, snapshot.users.state(), snapshot.catalogue.state()["ids"])

    def give_back(self, batch: Optional[ChangelogBatch]) -> None:
        """The checkpoint that was to carry ``batch`` failed: its changes go into the next one."""
        if batch is None:
            return
        for partition, users in batch.users.items():
            self._changed.setdefault(partition, set()).update(users)
        self._recent_changed.update(batch.ids)

    def _say_too_few(self, needed: int) -> None:
        if not self._too_few_told:
            self._too_few_told = True
            log.error("changelog topic %r has fewer partitions than %r (needs at least %d): the histories of the "
                      "partitions past its last do not follow them; give it as many partitions as the events topic",
                      self.settings.changelog_topic, self.settings.events_topic, needed)

    # -- newly assigned partitions, in --

    def hold(self, events: KafkaSource, partitions: list[Partition]) -> None:
        """Rebalance callback (no I/O there): fetch nothing of these until ``settle`` has taken them over."""
        mine = [tp for tp in partitions if tp[0] == self.settings.events_topic]
        if mine:
            events.hold(mine)
            self._to_adopt.update(mine)

    @property
    def holding(self) -> bool:
        return bool(self._to_adopt)

    def settle(self, events: KafkaSource, applied: dict[Partition, int], remember_ids: Callable[[np.ndarray], None],
               not_yet: frozenset = frozenset()) -> dict[Partition, int]:
        """Loop thread, after the poll: for each held partition, where this worker reads it from;
        with a changelog, its users' histories adopted as of there and its recent event ids handed
        to ``remember_ids`` (the de-duplication ledger); then it is released. Returns those start
        offsets (the caller's state moves up to them). ``not_yet``: partitions another part still
        holds (their start offset may yet move)."""
        assigned = set(events.assignment())
        starts: dict[Partition, int] = {}
        settled, waiting = [], []
        for tp in sorted(self._to_adopt - not_yet):
            if tp in assigned:
                try:
                    start = events.position(*tp)
                    if start is None:
                        waiting.append(tp)  # Kafka did not say yet: held until the next turn
                        continue
                    # Read only where this worker's state for it ends below the start (another
                    # member read on since), and not at offset 0 (no state holds events below
                    # it). Where it ends at or past the start (this worker's own checkpoint, whose
                    # commit had not landed), its histories already hold every event up there,
                    # and the records in between are read again and skipped: histories from the
                    # changelog as of the start would lose their events.
                    if self._partitions and start > 0 and applied.get(tp, -1) < start:
                        self._adopt(tp[1], start, remember_ids)
                except BrokerError as exc:
                    self.metrics.broker_error("changelog", exc)
                    log.warning("%s[%d]: could not take it over (%s); held until the next turn", tp[0], tp[1], exc)
                    waiting.append(tp)
                    continue
                starts[tp] = start
            settled.append(tp)
        self._to_adopt.difference_update(settled)
        events.release(settled)
        if waiting:
            events.hold(waiting)  # still held, whatever another part released in this turn
        return starts

    def _adopt(self, partition: int, start: int, remember_ids: Callable[[np.ndarray], None]) -> None:
        if partition >= self._partitions:
            self._say_too_few(partition + 1)
            return
        if self._reader is None:
            self._reader = KafkaConsumer(**self.settings.reader_kwargs("changelog"),
                                         bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
        chosen = choose(read_partition(self._reader, self.settings.changelog_topic, partition), start)
        adopted = self.learner.adopt_histories({user_id: (state.items, state.weights)
                                                for user_id, state in chosen.users.items()})
        remember_ids(chosen.ledger)
        recent = self._recent[partition] = RecentIds()  # its next checkpoint hands these on in turn
        recent.extend(chosen.ledger)
        self.metrics.users_adopted.inc(adopted)
        log.info("%s[%d] starts at offset %d here: adopted %d user histories and %d recent event ids from %r%s%s",
                 self.settings.events_topic, partition, start, adopted, len(chosen.ledger),
                 self.settings.changelog_topic,
                 f"; {chosen.ahead} written past that offset and not committed are rebuilt from the events read "
                 "again" if chosen.ahead else "",
                 f"; {chosen.unreadable} unreadable record(s) skipped" if chosen.unreadable else "")
