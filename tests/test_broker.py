import time

import pytest
from kafka import KafkaProducer

from stream.config import Settings
from stream.kafka.broker import EmbeddedBroker, ensure_topics, log_end_offsets, read_topic
from stream.kafka.clients import KafkaSource
from stream.kafka.errors import BrokerError

pytestmark = pytest.mark.integration


def fast_group_settings(bootstrap, group):
    # Short group timeouts so a join takes seconds, not minutes.
    return Settings(bootstrap_servers=bootstrap, group_id=group,
                    max_poll_interval_ms=5000, session_timeout_ms=6000)


def produce(bootstrap, topic, count, partitions):
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for i in range(count):
        producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode(), partition=i % partitions)
    producer.flush(30)
    producer.close()


def test_topics_offsets_group_read_and_commit(broker, unique_topic):
    topic = unique_topic("events")
    ensure_topics(broker.bootstrap, {topic: 3})
    ensure_topics(broker.bootstrap, {topic: 3})  # already exists is fine
    assert log_end_offsets(broker.bootstrap, topic) == {0: 0, 1: 0, 2: 0}

    produce(broker.bootstrap, topic, 1000, 3)
    ends = log_end_offsets(broker.bootstrap, topic)
    assert ends == {0: 334, 1: 333, 2: 333}

    settings = fast_group_settings(broker.bootstrap, unique_topic("group"))
    source = KafkaSource.from_settings(settings)
    assigned = []
    source.subscribe([topic], on_assigned=assigned.extend)
    seen, deadline = {}, time.monotonic() + 60
    while len(seen) < 1000 and time.monotonic() < deadline:
        for record in source.next_batch(500):
            seen[(record.partition, record.offset)] = record
    assert len(seen) == 1000
    assert sorted(assigned) == [(topic, 0), (topic, 1), (topic, 2)]
    assert seen[(1, 0)].value == b"v1" and seen[(1, 0)].key == b"k1"
    assert source.lag() == {topic: 0}
    assert source.commit({(topic, p): end for p, end in ends.items()})
    source.close()

    fresh = KafkaSource.from_settings(settings)
    try:
        assert {p: fresh.committed(topic, p) for p in ends} == ends
    finally:
        fresh.close()


def test_compacted_topic_and_read_topic(broker, unique_topic):
    topic = unique_topic("items")
    ensure_topics(broker.bootstrap, {topic: 1}, compacted={topic})
    produce(broker.bootstrap, topic, 5, 1)
    records = read_topic(broker.bootstrap, topic)
    assert [(r.offset, r.value) for r in records] == [(i, f"v{i}".encode()) for i in range(5)]


def test_unknown_topic_is_a_clear_error(broker, unique_topic):
    with pytest.raises(BrokerError, match="does not exist"):
        log_end_offsets(broker.bootstrap, unique_topic("missing"))


def test_broker_that_cannot_start_reports_its_log(tmp_path):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'boom: cannot bind' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(BrokerError, match="boom: cannot bind"):
        EmbeddedBroker(binary=str(fake), port=1, start_timeout_s=5).start()


def test_stop_terminates_the_process():
    with EmbeddedBroker() as b:
        proc = b._proc
        assert b.running
    assert proc.poll() is not None and not b.running
