"""Follow the whole items topic (every partition, no consumer group).

Every worker needs the full catalogue, not a group's share of it, so items are
read by manual assignment from the offsets saved in the checkpoint (or from
the beginning: the topic is compacted, the newest text per item wins).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from stream.kafka.clients import SourceRecord

log = logging.getLogger(__name__)


class ItemsFollower:
    def __init__(self, consumer: KafkaConsumer, topic: str, start_offsets: Optional[dict[int, int]] = None,
                 on_error=None, retry_s: float = 5.0) -> None:
        self._consumer = consumer
        self.topic = topic
        self._start = dict(start_offsets or {})
        self._assigned = False
        self._on_error = on_error
        self._retry_s = retry_s
        self._next_try = 0.0
        self.offsets: dict[int, int] = dict(self._start)  # next offset to read, per partition

    def restart_from(self, start_offsets: dict[int, int]) -> None:
        """Read again from these offsets (the worker rolled back to a checkpoint)."""
        self._start = dict(start_offsets)
        self.offsets = dict(self._start)
        self._assigned = False
        self._next_try = 0.0

    def _assign(self) -> bool:
        if time.monotonic() < self._next_try:
            return False
        try:
            partitions = self._consumer.partitions_for_topic(self.topic)
        except KafkaError as exc:
            partitions = None
            if self._on_error:
                self._on_error("items_metadata", exc)
        if not partitions:
            self._next_try = time.monotonic() + self._retry_s
            log.warning("items topic %r not found yet; retrying in %.0fs", self.topic, self._retry_s)
            return False
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        for tp in tps:
            if tp.partition in self._start:
                self._consumer.seek(tp, self._start[tp.partition])
            else:
                self._consumer.seek_to_beginning(tp)
        self._assigned = True
        return True

    def next_batch(self, timeout_ms: int = 0, max_records: int = 500) -> list[SourceRecord]:
        if not self._assigned and not self._assign():
            return []
        try:
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except (KafkaError, OSError) as exc:
            if self._on_error:
                self._on_error("items_poll", exc)
            log.warning("items poll failed: %s", exc)
            return []
        batch = []
        for tp in sorted(polled, key=lambda tp: tp.partition):
            for record in polled[tp]:
                batch.append(SourceRecord.from_consumer_record(record))
                self.offsets[tp.partition] = record.offset + 1
        return batch

    def close(self) -> None:
        try:
            self._consumer.close()
        except KafkaError:
            pass
