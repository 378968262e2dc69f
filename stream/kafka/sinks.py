"""Writing Kafka on kafka-python: producer sinks that never drop a record, and the producer.

The sinks (vectors, dead letters, the partition-state changelog) make delivery
failures visible in ``flush()`` and keep the records for ``resend()``, instead
of dropping them. Reading is ``stream.kafka.clients``.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterable, Optional

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.partitioner.default import DefaultPartitioner, murmur2

from learners.records import BadRecord
from stream.kafka.clients import SourceRecord
from stream.kafka.errors import BrokerError


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
