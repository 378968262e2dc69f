"""Kafka I/O on kafka-python: one consumer wrapper and two producer sinks.

The worker loop must keep running through broker trouble, so ``KafkaSource``
turns poll failures into an empty batch plus a capped backoff, while the sinks
make delivery failures visible in ``flush()`` instead of dropping them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from functools import partial
from operator import attrgetter
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.errors import FencedInstanceIdError, KafkaError
from kafka.partitioner.default import DefaultPartitioner, murmur2

from learners.records import BadRecord
from stream.kafka.errors import BrokerError

log = logging.getLogger(__name__)

Partition = tuple[str, int]
PartitionCallback = Callable[[list[Partition]], None]
ErrorCallback = Callable[[str, BaseException], None]


class SourceRecord(NamedTuple):
    """One consumed record. A NamedTuple, not a frozen dataclass: one is built per record on
    the ingest path, where a frozen dataclass's __init__ is a noticeable share of the per-event
    cost (docs/performance.md). ``headers`` are as the client hands them over
    (kafka-python: a list of (str, bytes) pairs)."""

    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    timestamp_ms: int
    headers: Sequence[tuple[str, bytes]] = ()

    @classmethod
    def from_consumer_record(cls, record) -> "SourceRecord":
        return _new_source_record(_CONSUMER_RECORD_FIELDS(record))


# A C-level getter and tuple.__new__, mapped over a partition's records: no Python-level
# constructor call per record on the ingest path.
_CONSUMER_RECORD_FIELDS = attrgetter("topic", "partition", "offset", "key", "value", "timestamp", "headers")
_new_source_record = partial(tuple.__new__, SourceRecord)

# How long one ``next_batch`` keeps polling while a group join is in flight (see there).
JOIN_POLL_S = 1.0


def _pairs(partitions: Iterable[TopicPartition]) -> list[Partition]:
    return sorted((tp.topic, tp.partition) for tp in partitions)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, source: "KafkaSource", on_assigned: Optional[PartitionCallback],
                 on_revoked: Optional[PartitionCallback], on_lost: Optional[PartitionCallback] = None):
        self._source = source
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._on_lost = on_lost

    def on_partitions_revoked(self, revoked):
        if self._on_revoked is not None:
            self._on_revoked(_pairs(revoked))

    def on_partitions_lost(self, lost):
        # Forced out of the group (session or poll timeout): the partitions may already
        # belong to another member and a commit would be refused.
        if self._on_lost is not None:
            self._on_lost(_pairs(lost))
        elif self._on_revoked is not None:
            self._on_revoked(_pairs(lost))

    def on_partitions_assigned(self, assigned):
        self._source.keep_paused(assigned)
        if self._on_assigned is not None:
            self._on_assigned(_pairs(assigned))


class KafkaSource:
    """A group consumer that commits by hand and never raises from ``next_batch``."""

    def __init__(self, consumer: Union[KafkaConsumer, Callable[[], KafkaConsumer]], *,
                 on_error: Optional[ErrorCallback] = None,
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep, join_poll_s: float = JOIN_POLL_S):
        if callable(consumer) and not hasattr(consumer, "poll"):
            try:
                consumer = consumer()
            except KafkaError as exc:
                raise BrokerError(f"could not create the Kafka consumer: {exc}") from exc
        self._consumer = consumer
        self._on_error = on_error
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._join_poll_s = join_poll_s
        self._failures = 0
        self._paused = False
        self._held: set[TopicPartition] = set()  # kept paused until released (stream/worker/group_restore.py)

    @classmethod
    def from_settings(cls, settings, *, on_error: Optional[ErrorCallback] = None,
                      **consumer_overrides) -> "KafkaSource":
        kwargs = {**settings.consumer_kwargs(), **consumer_overrides}
        return cls(lambda: KafkaConsumer(**kwargs), on_error=on_error)

    # --- group membership ---------------------------------------------------
    def subscribe(self, topics: Iterable[str], on_assigned: Optional[PartitionCallback] = None,
                  on_revoked: Optional[PartitionCallback] = None,
                  on_lost: Optional[PartitionCallback] = None) -> None:
        self._consumer.subscribe(topics=list(topics), listener=_Listener(self, on_assigned, on_revoked, on_lost))

    def assignment(self) -> list[Partition]:
        return _pairs(self._consumer.assignment())

    def rejoin_pending(self) -> bool:
        """True when the group asked this member, still a member, to rejoin: its next poll
        revokes its partitions. (False once forced out: then they are lost, not revoked.)"""
        coordinator = getattr(self._consumer, "_coordinator", None)
        try:
            if coordinator is None or not coordinator.need_rejoin():
                return False
            generation = getattr(coordinator, "_generation", None)
            return not (generation is not None and generation.is_lost())
        except Exception:  # noqa: BLE001 - a client without these internals: no early warning, callbacks still run
            return False

    def joining(self) -> bool:
        """True from this member's JoinGroup until its assignment is taken in (a rebalance in flight)."""
        # A client without these internals: never joining, so it polls as usual.
        return bool(getattr(getattr(self._consumer, "_coordinator", None), "rejoining", False))

    def topic_exists(self, topic: str) -> Optional[bool]:
        """Whether the cluster knows ``topic`` (fresh metadata); None when it cannot be asked."""
        try:
            return topic in self._consumer.topics()
        except (KafkaError, OSError) as exc:
            if self._on_error is not None:
                self._on_error("metadata", exc)
            return None

    # --- reading --------------------------------------------------------------
    def next_batch(self, timeout_ms: int = 1000) -> list[SourceRecord]:
        """One poll, flattened in (topic, partition, offset) order; [] on broker trouble.

        While a group join is in flight it goes on polling, up to ``join_poll_s``: kafka-python
        (3.0.x) drops a JoinGroup/SyncGroup round that completes outside ``poll()`` and sends a
        new JoinGroup, so a caller that works between short polls can rejoin forever where
        joins take seconds (a group waiting for its members, a broker that delays joins)."""
        try:
            polled = self._consumer.poll(timeout_ms=timeout_ms)
            deadline = time.monotonic() + self._join_poll_s
            while not polled and self.joining() and (left := deadline - time.monotonic()) > 0:
                polled = self._consumer.poll(timeout_ms=max(1, int(left * 1000)))
        except FencedInstanceIdError as exc:
            raise _fenced(exc) from exc
        except (KafkaError, OSError) as exc:
            self._failed("poll", exc)
            return []
        self._failures = 0
        batch = []
        for tp in sorted(polled, key=lambda tp: (tp.topic, tp.partition)):
            batch.extend(map(_new_source_record, map(_CONSUMER_RECORD_FIELDS, polled[tp])))
        return batch

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._failures += 1
        delay = min(self._backoff_max_s, self._backoff_initial_s * 2 ** (self._failures - 1))
        log.warning("kafka %s failed (%s: %s); retrying in %.1fs",
                    operation, type(exc).__name__, exc, delay)
        if self._on_error is not None:
            self._on_error(operation, exc)
        # Sleep here so a dead broker can never turn the worker loop into a busy loop.
        self._sleep(delay)

    # --- backpressure ---------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    def pause_all(self) -> None:
        """Stop fetching; keep calling ``next_batch`` so the group membership stays alive."""
        self._paused = True
        assigned = self._consumer.assignment()
        if assigned:
            self._consumer.pause(*assigned)

    def keep_paused(self, assigned: list[TopicPartition]) -> None:
        """Newly assigned partitions start unpaused: while fetching is paused, pause them too."""
        if self._paused and assigned:
            self._consumer.pause(*assigned)

    def resume_all(self) -> None:
        self._paused = False
        paused = [tp for tp in self._consumer.paused() if tp not in self._held]
        if paused:
            self._consumer.resume(*paused)

    def hold(self, partitions: list[Partition]) -> None:
        """Fetch nothing of these until ``release``, whatever backpressure does meanwhile."""
        held = [TopicPartition(t, p) for t, p in partitions]
        self._held.update(held)
        self._consumer.pause(*held)

    def release(self, partitions: list[Partition]) -> None:
        """Fetch these again (still paused while backpressure pauses everything); unassigned ones are dropped."""
        released = {TopicPartition(t, p) for t, p in partitions}
        self._held -= released
        assigned = set(self._consumer.assignment())
        resume = [tp for tp in released if tp in assigned]
        if resume and not self._paused:
            self._consumer.resume(*resume)

    # --- positions and offsets ------------------------------------------------
    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._consumer.seek(TopicPartition(topic, partition), offset)

    def commit(self, offsets: dict[Partition, int]) -> bool:
        """Commit NEXT offsets to read; False (logged, counted) if the group refused."""
        if not offsets:
            return True
        payload = {TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
                   for (topic, partition), offset in offsets.items()}
        try:
            self._consumer.commit(offsets=payload)
        except FencedInstanceIdError as exc:
            raise _fenced(exc) from exc
        except KafkaError as exc:
            # A later commit carries newer offsets; a restart resumes from the checkpoint.
            log.warning("offset commit failed (%s: %s)", type(exc).__name__, exc)
            if self._on_error is not None:
                self._on_error("commit", exc)
            return False
        return True

    def commit_nowait(self, offsets: dict[Partition, int]) -> None:
        """Queue a commit without blocking: the only kind allowed inside a rebalance
        callback, which kafka-python runs on its I/O thread."""
        if not offsets:
            return
        payload = {TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
                   for (topic, partition), offset in offsets.items()}

        def done(_offsets, response):
            if isinstance(response, BaseException):
                log.warning("offset commit during rebalance failed: %s", response)
                if self._on_error is not None:
                    self._on_error("commit", response)

        self._consumer.commit_async(offsets=payload, callback=done)

    def position(self, topic: str, partition: int, timeout_ms: int = 5000) -> Optional[int]:
        """The next offset this member reads of an assigned partition (its commit, or where it was
        sought to); None when Kafka did not say within ``timeout_ms``."""
        try:
            return self._consumer.position(TopicPartition(topic, partition), timeout_ms=timeout_ms)
        except KafkaError as exc:
            raise BrokerError(f"could not read the position of {topic}[{partition}]: {exc}") from exc

    def committed(self, topic: str, partition: int) -> Optional[int]:
        try:
            return self._consumer.committed(TopicPartition(topic, partition))
        except KafkaError as exc:
            raise BrokerError(f"could not read the committed offset of {topic}[{partition}]: {exc}") from exc

    def highwater(self, topic: str, partition: int) -> Optional[int]:
        """The partition's log end as of the last fetch (None before one)."""
        try:
            return self._consumer.highwater(TopicPartition(topic, partition))
        except (KafkaError, AssertionError):  # not assigned (any more)
            return None

    def partitions(self, topic: str) -> list[int]:
        """The topic's partitions (fresh metadata); [] when it does not exist."""
        try:
            return sorted(self._consumer.partitions_for_topic(topic) or ())
        except KafkaError as exc:
            raise BrokerError(f"could not read the partitions of {topic}: {exc}") from exc

    def lag(self) -> dict[str, int]:
        """Records behind per topic, from fetch highwaters (no ListOffsets round trip)."""
        lag: dict[str, int] = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue  # not fetched yet: unknown, not zero
            try:
                position = self._consumer.position(tp, timeout_ms=100)
            except KafkaError:
                continue
            if position is None:
                continue
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, highwater - position)
        return lag

    def close(self) -> None:
        try:
            self._consumer.close(autocommit=False)
        except KafkaError as exc:
            log.warning("closing the consumer failed: %s", exc)


def _fenced(exc: BaseException) -> BrokerError:
    return BrokerError(
        f"another worker joined the group with this worker's group instance id ({exc}): two live workers "
        "share one --group-instance-id (with 'auto': the same host and --state-dir). This one stops, its "
        "last checkpoint stands. Give every worker its own --state-dir, or its own --group-instance-id.")


class _ProducerSink:
    """Sends records; delivery failures surface in ``flush`` and the records are kept for ``resend``.

    A record is never dropped: one the producer refused to queue (no metadata,
    buffer full) or that failed after the producer's own retries is parked by
    ``flush`` (which raises ``BrokerError`` once for them) until ``resend``.
    Records still in flight when ``flush`` times out are *not* parked: the
    producer may yet deliver them, and re-sending would write them twice.

    Sending is a per-record cost when every event republishes a vector, so a
    record costs one ``send`` and one append: outcomes are read off the
    producer's futures afterwards (``_settle``), not by callbacks that would
    run for every record on the producer's I/O thread.
    """

    def __init__(self, producer: KafkaProducer, topic: str):
        self._producer = producer
        self.topic = topic
        self._lock = threading.Lock()  # the loop and the trainer's thread both publish
        self._pending: deque = deque()  # (future, record) handed to the producer, oldest first
        self._failed: list[tuple] = []  # (key, value, headers, partition, exception): not delivered, not reported
        self._parked: list[tuple] = []  # reported by flush, waiting for resend

    def use_producer(self, producer: KafkaProducer) -> None:
        """Send through ``producer`` from now on (the old one was given up)."""
        self._producer = producer

    def _send_all(self, records: Iterable[tuple[Optional[bytes], Optional[bytes], Optional[list], Optional[int]]]
                  ) -> None:
        """Records as (key, value, headers, partition); partition None: the producer's partitioner."""
        refused: Optional[BaseException] = None
        sent: list[tuple] = []
        failed: list[tuple] = []
        send, topic = self._producer.send, self.topic
        for record in records:
            if refused is None:
                key, value, headers, partition = record
                try:
                    if partition is None:
                        future = send(topic, key=key, value=value, headers=headers)
                    else:
                        future = send(topic, key=key, value=value, headers=headers, partition=partition)
                except KafkaError as exc:
                    # Refused before queueing (e.g. no metadata): park the rest rather than block per record.
                    refused = exc
                else:
                    sent.append((future, record))
                    continue
            failed.append((*record, refused))
        with self._lock:
            self._settle()  # what Kafka acknowledged meanwhile is let go, so ``_pending`` stays ~in flight
            self._pending.extend(sent)
            self._failed.extend(failed)

    def _settle(self, everything: bool = False) -> None:
        """Take the finished records off ``_pending``: failed ones to ``_failed``, acknowledged ones to
        ``_delivered``. From the oldest up to the first unfinished one, or all of them with
        ``everything``. Call with the lock held."""
        pending, unfinished = self._pending, deque()
        while pending:
            future, record = pending[0]
            if not future.is_done:
                if not everything:
                    break
                unfinished.append(pending.popleft())
                continue
            pending.popleft()
            if future.exception is not None:
                self._failed.append((*record, future.exception))
            else:
                self._delivered(future.value)
        pending.extendleft(reversed(unfinished))

    @property
    def in_flight(self) -> int:
        """Records handed to the producer and not yet acknowledged (or failed); an upper bound
        while an older record is still out."""
        with self._lock:
            self._settle()
            return len(self._pending)

    def _delivered(self, metadata) -> None:
        """One record the broker acknowledged (called with the lock held)."""

    def flush(self, timeout: Optional[float] = 30.0) -> None:
        try:
            self._producer.flush(timeout=timeout)
        except KafkaError as exc:
            raise BrokerError(f"flushing {self.topic} did not finish in {timeout}s: {exc}") from exc
        with self._lock:
            self._settle(everything=True)
            failed, self._failed = self._failed, []
            self._parked.extend(failed)
        if failed:
            first = failed[0][-1]
            raise BrokerError(f"{len(failed)} record(s) to {self.topic} failed after the producer's "
                              f"retries (kept for resending); first: {type(first).__name__}: {first}")

    @property
    def undelivered(self) -> int:
        """Records known not to be in Kafka (parked or failed since the last flush)."""
        with self._lock:
            self._settle()
            return len(self._parked) + len(self._failed)

    def resend(self) -> int:
        """Send the parked records again; returns how many."""
        with self._lock:
            parked, self._parked = self._parked, []
        self._send_all(record[:4] for record in parked)
        return len(parked)


class VectorSink(_ProducerSink):
    def write_batch(self, records: list[tuple[bytes, bytes]]) -> None:
        self._send_all((key, value, None, None) for key, value in records)


class DeadLetterSink(_ProducerSink):
    def __init__(self, producer: KafkaProducer, topic: str):
        super().__init__(producer, topic)
        # Next offset after the last record this sink got acknowledged, per partition: every
        # dead-letter record sent after a checkpoint holding these lies at or above them.
        self._next_offsets: dict[int, int] = {}

    @property
    def next_offsets(self) -> dict[int, int]:
        with self._lock:
            self._settle(everything=True)
            return dict(self._next_offsets)

    def _delivered(self, metadata) -> None:
        partition, offset = getattr(metadata, "partition", None), getattr(metadata, "offset", None)
        if partition is not None and offset is not None and offset >= 0:
            self._next_offsets[partition] = max(self._next_offsets.get(partition, 0), offset + 1)

    def write_batch(self, items: list[tuple[BadRecord, SourceRecord]]) -> None:
        records = []
        for bad, source in items:
            headers = [
                ("reason", bad.reason.encode()),
                ("detail", bad.detail.encode("utf-8", "replace")),
                ("source_topic", source.topic.encode()),
                ("source_partition", str(source.partition).encode()),
                ("source_offset", str(source.offset).encode()),
            ]
            # The original bytes, untouched, so the record can be replayed after a fix.
            records.append((source.key, source.value if source.value is not None else b"", headers, None))
        self._send_all(records)


class ChangelogSink(_ProducerSink):
    """The partition-state changelog (stream/kafka/changelog.py): records go to the partition of
    the same number as the events partition their state belongs to."""

    def __init__(self, producer: KafkaProducer, topic: str, partitions: int):
        super().__init__(producer, topic)
        self.partitions = partitions

    def write_batch(self, partition: int, records: list[tuple[bytes, bytes]]) -> None:
        self._send_all((key, value, None, partition) for key, value in records)

    def tombstone(self, key: bytes) -> None:
        """Delete ``key`` wherever it may be: every partition gets a record with no value."""
        self._send_all((key, None, None, partition) for partition in range(self.partitions))


class KeyCachingPartitioner(DefaultPartitioner):
    """kafka-python's default partitioner (murmur2 of the key, as the Java client) with the
    partition of recently seen keys remembered.

    Its murmur2 is pure Python and it lists the available partitions on every call:
    together the largest per-record cost of ``send`` when every event republishes a user
    vector. Same partition for every key; the cache is
    dropped whole when it holds ``max_keys`` keys or the topic's partition count changes.
    """

    def __init__(self, max_keys: int = 1 << 17) -> None:
        self.max_keys = max_keys
        self._cache: dict[tuple[str, bytes], tuple[int, int]] = {}

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        if serialized_key is None:
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)
        cached = self._cache.get((topic, serialized_key))
        if cached is not None and cached[0] == len(partitions):
            return cached[1]
        chosen = sorted(partitions)[(murmur2(serialized_key) & 0x7FFFFFFF) % len(partitions)]
        if len(self._cache) >= self.max_keys:
            self._cache.clear()
        self._cache[(topic, serialized_key)] = (len(partitions), chosen)
        return chosen


def make_producer(settings, **overrides) -> KafkaProducer:
    try:
        return KafkaProducer(**{**settings.producer_kwargs(), "partitioner": KeyCachingPartitioner(), **overrides})
    except KafkaError as exc:
        raise BrokerError(f"could not create the Kafka producer: {exc}") from exc
