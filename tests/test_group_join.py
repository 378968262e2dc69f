"""A group join that takes seconds still lands when the caller works between polls.

kafka-python drops a JoinGroup/SyncGroup round that completes outside ``poll()`` and sends a
new JoinGroup; ``KafkaSource.next_batch`` stays inside poll while a join is in flight, and the
worker does nothing slow between polls meanwhile.
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer

from fake_kafka import FakeConsumer
from stream.kafka.broker import ensure_topics
from stream.kafka.clients import KafkaSource
from worker_fakes import TP0, FakeItems, consumer_record, event_bytes, item_record, make_worker


class _Coordinator:
    """A join in flight until it lands in its consumer's poll number ``polls``."""

    def __init__(self, consumer: FakeConsumer, polls: int) -> None:
        self._consumer, self._polls = consumer, polls

    @property
    def rejoining(self) -> bool:
        return self._consumer.poll_calls < self._polls


def test_while_a_join_is_in_flight_one_batch_polls_until_it_lands():
    records = {TP0: [consumer_record(0, event_bytes(0))]}
    consumer = FakeConsumer([{}, {}, records])  # the poll the join lands in fetches too
    consumer._coordinator = _Coordinator(consumer, polls=3)
    source = KafkaSource(consumer, join_poll_s=5.0)
    assert source.joining()
    batch = source.next_batch(timeout_ms=10)
    assert consumer.poll_calls == 3 and [r.offset for r in batch] == [0]
    assert not source.joining()
    source.next_batch(timeout_ms=10)
    assert consumer.poll_calls == 4  # no join: one poll a batch


def test_a_join_that_does_not_land_returns_after_the_join_poll_budget():
    consumer = FakeConsumer()
    consumer._coordinator = _Coordinator(consumer, polls=10 ** 9)
    source = KafkaSource(consumer, join_poll_s=0.2)
    started = time.monotonic()
    assert source.next_batch(timeout_ms=10) == []
    assert 0.2 <= time.monotonic() - started < 2.0 and consumer.poll_calls > 1


def test_the_worker_encodes_no_item_texts_while_its_group_join_is_in_flight(tmp_path):
    worker, consumer, _ = make_worker(tmp_path)
    encoded = []
    worker.learner.add_items = lambda items: encoded.extend(items) or []
    worker.consumers.items = FakeItems([item_record(0, b'{"item_id": "i0", "text": "a film"}')])
    joining = [True]
    worker.consumers.events.joining = lambda: joining[0]
    worker.turn()
    assert encoded == []
    joining[0] = False
    worker.turn()
    assert [item.item_id for item in encoded] == ["i0"]


@pytest.mark.integration
def test_a_member_that_works_a_second_between_polls_gets_its_partitions(broker, unique_topic):
    topic = unique_topic("events")
    ensure_topics(broker.bootstrap, {topic: 4})
    source = KafkaSource(KafkaConsumer(bootstrap_servers=[broker.bootstrap], group_id=unique_topic("group"),
                                       enable_auto_commit=False, session_timeout_ms=10_000,
                                       heartbeat_interval_ms=3_000))
    source.subscribe([topic])
    try:
        deadline = time.monotonic() + 60
        while not source.assignment() and time.monotonic() < deadline:
            source.next_batch(timeout_ms=200)
            time.sleep(1.0)  # the caller's own work: longer than its polls
        assert sorted(p for _, p in source.assignment()) == [0, 1, 2, 3]
    finally:
        source.close()
