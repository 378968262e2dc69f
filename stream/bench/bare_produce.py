"""The bare consume -> produce reference: what publishing costs without the worker around it.

A plain kafka-python loop reads the pre-produced events, ``json.loads`` each,
and for every user touched in a publish window sends one record of the
worker's exact output shape: the same encoder (``encode_vectors`` with
``user_extras``: a ``because`` of up to three items and the user's
``recent_items``, kept here as a plain list per user), the same key, the same producer
(``make_producer``: partitioner, linger, batch size, acks) and the same window
(``USER_PUBLISH_WINDOW_S``) and the same bound on records in flight (a flush
once more than ``MAX_UNACKNOWLEDGED_VECTORS`` are unacknowledged, as the
worker's ``deliver_refused``), so the two cannot drift apart. What it leaves out
is the worker's own work: validation, de-duplication, user state, the model's
vectors (a fixed table of random rows stands in) and the delivery bookkeeping.

The clock runs as the worker's does in the ingest section: from the first
handled batch to the last record handed to the producer; the final flush is
not timed (the worker's is part of its checkpoint).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque

import numpy as np

from stream.kafka.messages import encode_vectors, user_extras
from stream.kafka.sinks import make_producer
from stream.worker.publisher import MAX_UNACKNOWLEDGED_VECTORS, USER_PUBLISH_WINDOW_S

_WEIGHTS = {"click": 1.0, "purchase": 2.0, "favourite": 3.0}
_BECAUSE_ITEMS = 3
_VECTOR_ROWS = 4096


def bare_produce(settings, topic: str, n: int, dim: int, client_kwargs: dict, timeout_s: float) -> float:
    """Events/s of poll + ``json.loads`` + one vector record per touched user and window."""
    from kafka import KafkaConsumer

    vectors = np.random.default_rng(0).standard_normal((_VECTOR_ROWS, dim)).astype(np.float32)
    consumer = KafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers.split(","),
                             group_id=f"bench-bare-produce-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=settings.max_poll_records,
                             fetch_max_wait_ms=settings.fetch_max_wait_ms, **client_kwargs)
    producer = make_producer(settings)
    out_topic, send, loads = settings.vectors_topic, producer.send, json.loads
    window: dict[str, None] = {}  # users touched in this window, in order
    recent: dict[str, list] = {}  # user -> their newest distinct (item, weight), newest first
    keep = max(settings.recent_items, _BECAUSE_ITEMS)
    window_started = 0.0
    in_flight: deque = deque()  # futures of the records sent since the last flush, oldest first

    def touch(user: str, item: str, weight: float) -> None:
        newest = [(item, weight)] + [pair for pair in recent.get(user, ()) if pair[0] != item]
        recent[user] = newest[:keep]
        window[user] = None

    def publish() -> None:
        users = list(window)
        extras = user_extras([recent[u][:_BECAUSE_ITEMS] for u in users],
                             [[item for item, _ in recent[u][:settings.recent_items]] for u in users])
        rows = vectors[np.arange(len(users)) % _VECTOR_ROWS]
        for key, value in encode_vectors("user", users, rows, 0, time.time(), extras):
            in_flight.append(send(out_topic, key=key, value=value))
        window.clear()
        while in_flight and in_flight[0].is_done:
            in_flight.popleft()
        if len(in_flight) > MAX_UNACKNOWLEDGED_VECTORS:
            producer.flush()
            in_flight.clear()

    try:
        seen, first, started = 0, 0, None
        deadline = time.monotonic() + timeout_s
        while seen < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare consume->produce read {seen} of {n} records in {timeout_s:.0f}s")
            polled = consumer.poll(timeout_ms=500)
            for records in polled.values():
                for record in records:
                    event = loads(record.value)
                    if not window:
                        window_started = time.monotonic()
                    touch(event["user_id"], event["item_id"], _WEIGHTS.get(event["event_type"], 1.0))
                seen += len(records)
            if window and (seen >= n or time.monotonic() - window_started >= USER_PUBLISH_WINDOW_S):
                publish()
            if started is None and seen:
                started, first = time.perf_counter(), seen
        elapsed = time.perf_counter() - started
        producer.flush()
    finally:
        consumer.close(autocommit=False)
        producer.close()
    return (n - first) / elapsed if elapsed > 0 else float("nan")
