"""Reading Kafka on kafka-python: the events consumer (``KafkaSource``) and its records.

The worker loop must keep running through broker trouble, so ``KafkaSource``
turns poll failures into an empty batch plus a capped backoff. Writing is
``stream.kafka.sinks``.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from operator import attrgetter
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import FencedInstanceIdError, KafkaError

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
