"""What a restarted worker needs to know beyond its checkpoint.

A checkpoint holds everything applied up to its offsets. Records read after it
are read again after a crash, and two of their effects reached Kafka before
the crash and cannot be taken back:

* dead-letter records: ``scan_dead_letters`` reads the dead-letter topic from
  the positions saved in the checkpoint to its end and returns the source
  ``(topic, partition, offset)`` of every record found there (from the
  ``source_*`` headers), so the worker does not dead-letter them twice;
* vectors published with a model version above the checkpoint's: the
  ``PublishedVersionMark`` file is made durable *before* any vector of a new
  version is sent, so a restored model can continue above every version
  already published and ``model_version`` never goes backwards in the vectors
  topic. (Re-publishing a vector itself is harmless: the topic is compacted
  and the newest record per key wins.)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

from kafka import KafkaConsumer, TopicPartition

from learners.errors import RecstreamError
from stream.kafka.broker import caught_up, poll_to_end

log = logging.getLogger(__name__)

Source = tuple[str, int, int]  # (source_topic, source_partition, source_offset)


def dead_letter_source(headers) -> Optional[Source]:
    """The ``(topic, partition, offset)`` a dead-letter record came from, from its headers."""
    values = {}
    for name, value in headers or ():
        if name in ("source_topic", "source_partition", "source_offset") and value is not None:
            values[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    try:
        return values["source_topic"], int(values["source_partition"]), int(values["source_offset"])
    except (KeyError, ValueError):
        return None


def scan_dead_letters(consumer: KafkaConsumer, topic: str, start: dict[int, int], sources: Iterable[str], *,
                      quiet_s: float = 3.0, timeout_s: float = 120.0) -> tuple[set[Source], dict[int, int]]:
    """Read ``topic`` from ``start`` (the beginning for partitions not in it) to its end.

    Returns the sources of the records whose ``source_topic`` is in ``sources``
    and the end offset reached per partition. A missing topic holds nothing.
    Uses fetch highwaters to know the end (tansu's ListOffsets answers are not
    reliable); without them, ``quiet_s`` without data has to do. Raises
    ``BrokerError`` if the end is not reached within ``timeout_s``.
    """
    wanted = set(sources)
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        return set(), {}
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    for tp in tps:
        if tp.partition in start:
            consumer.seek(tp, start[tp.partition])  # past the end (a recreated topic): auto_offset_reset
        else:
            consumer.seek_to_beginning(tp)
    found: set[Source] = set()

    def collect_sources(records) -> None:
        for record in records:
            source = dead_letter_source(record.headers)
            if source is not None and source[0] in wanted:
                found.add(source)

    ends = {tp.partition: start.get(tp.partition, 0) for tp in tps}
    poll_to_end(consumer, tps, ends, collect_sources,
                lambda quiet: caught_up(consumer, tps) or quiet >= quiet_s,
                poll_ms=200, timeout_s=timeout_s, what=f"the dead-letter topic {topic!r}")
    return found, ends


class StateDirError(RecstreamError):
    """The state dir cannot be written (full, read-only): the worker stops, since no vector of a new
    model version may go out before its mark is on disk."""


class PublishedVersionMark:
    """The highest model version vectors may have been published with, durable in ``state_dir``.

    ``advance(v)`` returns only once ``v`` is on disk (tmp + fsync + rename),
    and the worker calls it before sending any vector of version ``v``; a
    crash can therefore leave the mark above what was published, never below.
    Where it cannot be written, ``advance`` raises ``StateDirError`` and nothing is sent.
    """

    FILE = "published-version.json"

    def __init__(self, state_dir: os.PathLike | str) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / self.FILE
        self.value = self._read()
        # The loop thread (user vectors) and the trainer thread (item vectors) both advance
        # it; one writer at a time, or both would rename the same tmp file.
        self._lock = threading.Lock()

    def _read(self) -> int:
        try:
            return int(json.loads(self.path.read_bytes())["model_version"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Written atomically, so this is outside interference; the checkpoint's version still applies.
            log.warning("cannot read %s (%s): assuming no version above the checkpoint's was published",
                        self.path, exc)
            return 0

    def advance(self, version: int) -> None:
        if version <= self.value:
            return
        with self._lock:
            if version > self.value:
                try:
                    self._write(version)
                except OSError as exc:
                    raise StateDirError(
                        f"cannot record model version {version} as published in {self.dir} ({exc}), and its "
                        f"vectors must not go out before that is on disk: free space in {self.dir} or make it "
                        "writable, then start the worker again; it resumes from its last checkpoint and reads "
                        "the records after it again (nothing is lost or applied twice)") from exc

    def _write(self, version: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{self.FILE}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(json.dumps({"model_version": int(version), "at": time.time()}).encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.value = int(version)
