"""Publish offline files (events.jsonl / items.jsonl, docs/formats.md) to Kafka as they are."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from kafka import KafkaProducer


def _lines(path: Path):
    with open(path, "rb") as handle:
        for line in handle:
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield line


def _key(line: bytes, field: str) -> Optional[bytes]:
    # Bad lines are published too: the worker dead-letters them, as it would from any producer.
    try:
        value = json.loads(line).get(field)
    except (ValueError, AttributeError):
        return None
    return value.encode() if isinstance(value, str) else None


def replay_files(bootstrap: str, events_path: Optional[str], items_path: Optional[str],
                 events_topic: str = "events", items_topic: str = "items", rate: float = 0.0) -> dict:
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), linger_ms=20, acks="all")
    sent = {"items": 0, "events": 0}
    try:
        if items_path:
            for line in _lines(Path(items_path)):
                producer.send(items_topic, key=_key(line, "item_id"), value=line)
                sent["items"] += 1
            producer.flush()
        if events_path:
            started = time.monotonic()
            for line in _lines(Path(events_path)):
                producer.send(events_topic, key=_key(line, "user_id"), value=line)
                sent["events"] += 1
                if rate > 0:
                    ahead = sent["events"] / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            producer.flush()
    finally:
        producer.close()
    return sent
