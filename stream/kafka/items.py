"""Follow a whole topic (every partition, no consumer group): the items, and the forget requests.

Every worker needs the full catalogue, not a group's share of it, so items are
read by manual assignment from the offsets saved in the checkpoint (or from
the beginning: the topic is compacted, the newest text per item wins). The
forget topic is followed the same way: every worker holds any user's state
and replay samples, so every worker applies every erasure.
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
    """``name`` prefixes the broker-error operations (``<name>_metadata``, ``<name>_poll``) and the
    log lines; a missing topic is looked for again every ``retry_s`` and said at most every ``warn_s``."""

    def __init__(self, consumer: KafkaConsumer, topic: str, start_offsets: Optional[dict[int, int]] = None,
                 on_error=None, retry_s: float = 5.0, name: str = "items", warn_s: float = 0.0) -> None:
        self._consumer = consumer
        self.topic = topic
        self.name = name
        self._start = dict(start_offsets or {})
        self._assigned = False
        self._on_error = on_error
        self._retry_s = retry_s
        self._warn_s = warn_s
        self._next_try = 0.0
        self._next_warning = 0.0
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
                self._on_error(f"{self.name}_metadata", exc)
        if not partitions:
            now = time.monotonic()
            self._next_try = now + self._retry_s
            if now >= self._next_warning:
                self._next_warning = now + self._warn_s
                log.warning("%s topic %r not found yet; retrying every %.0fs", self.name, self.topic, self._retry_s)
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
                self._on_error(f"{self.name}_poll", exc)
            log.warning("%s poll failed: %s", self.name, exc)
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
