from types import SimpleNamespace

import pytest
from kafka import OffsetAndMetadata, TopicPartition
from kafka.errors import CommitFailedError, KafkaConnectionError, KafkaTimeoutError
from kafka.future import Future

from learners.records import BadRecord
from stream.kafka.clients import KafkaSource, SourceRecord
from stream.kafka.errors import BrokerError
from stream.kafka.sinks import DeadLetterSink, VectorSink
from fake_kafka import FakeConsumer


def consumer_record(topic, partition, offset, key=b"k", value=b"v"):
    return SimpleNamespace(topic=topic, partition=partition, offset=offset, key=key, value=value,
                           timestamp=1000 + offset, headers=[("h", b"1")])


def make_source(consumer):
    errors, sleeps = [], []
    source = KafkaSource(consumer, on_error=lambda op, exc: errors.append((op, type(exc))),
                         backoff_initial_s=0.1, backoff_max_s=0.5, sleep=sleeps.append)
    return source, errors, sleeps


def test_next_batch_flattens_in_partition_order():
    tp0, tp1 = TopicPartition("events", 0), TopicPartition("events", 1)
    consumer = FakeConsumer([{tp1: [consumer_record("events", 1, 5)],
                              tp0: [consumer_record("events", 0, 7), consumer_record("events", 0, 8)]}])
    source, _, _ = make_source(consumer)
    batch = source.next_batch(100)
    assert [(r.partition, r.offset) for r in batch] == [(0, 7), (0, 8), (1, 5)]
    assert batch[0] == SourceRecord("events", 0, 7, b"k", b"v", 1007, [("h", b"1")])  # headers as the client gives them


def test_broker_errors_back_off_and_return_empty():
    failure = KafkaConnectionError("down")
    consumer = FakeConsumer([failure] * 5 + [{}, failure])
    source, errors, sleeps = make_source(consumer)
    assert [source.next_batch(10) for _ in range(7)] == [[]] * 7
    assert errors == [("poll", KafkaConnectionError)] * 6
    # Doubling, capped, and reset by the successful poll in between.
    assert sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.1])


def test_factory_failure_is_a_broker_error():
    def factory():
        raise KafkaTimeoutError("Unable to bootstrap")

    with pytest.raises(BrokerError, match="consumer"):
        KafkaSource(factory)


def test_commit_maps_next_offsets():
    consumer = FakeConsumer()
    source, _, _ = make_source(consumer)
    assert source.commit({("events", 0): 11, ("items", 2): 4})
    assert consumer.commits == [{TopicPartition("events", 0): OffsetAndMetadata(11, "", -1),
                                 TopicPartition("items", 2): OffsetAndMetadata(4, "", -1)}]


def test_commit_failure_is_reported_not_raised():
    consumer = FakeConsumer()
    consumer.commit = lambda offsets: (_ for _ in ()).throw(CommitFailedError("rebalanced"))
    source, errors, _ = make_source(consumer)
    assert source.commit({("events", 0): 1}) is False
    assert errors == [("commit", CommitFailedError)]


def test_pause_resume_and_rebalance_keep_backpressure():
    tp0, tp1 = TopicPartition("events", 0), TopicPartition("events", 1)
    consumer = FakeConsumer()
    consumer.assigned = {tp0}
    source, _, _ = make_source(consumer)
    assigned, revoked = [], []
    source.subscribe(["events"], assigned.append, revoked.append)
    source.pause_all()
    assert source.paused and consumer.paused_set == {tp0}
    consumer.listener.on_partitions_revoked({tp0})
    consumer.listener.on_partitions_assigned({tp1, tp0})
    assert revoked == [[("events", 0)]] and assigned == [[("events", 0), ("events", 1)]]
    assert consumer.paused_set == {tp0, tp1}
    source.resume_all()
    assert not source.paused and consumer.paused_set == set()


def test_held_partitions_stay_paused_through_backpressure_until_released():
    tp0, tp1 = TopicPartition("events", 0), TopicPartition("events", 1)
    consumer = FakeConsumer()
    consumer.assigned = {tp0, tp1}
    source, _, _ = make_source(consumer)
    source.hold([("events", 1)])
    source.pause_all()
    source.resume_all()  # backpressure over: the held one still waits (stream/worker/group_restore.py)
    assert consumer.paused_set == {tp1}
    source.pause_all()
    source.release([("events", 1)])  # released while everything is paused: stays paused until resume_all
    assert consumer.paused_set == {tp0, tp1}
    source.resume_all()
    assert consumer.paused_set == set()


def test_lag_uses_highwater_and_skips_unknown():
    a0, a1, b0 = TopicPartition("events", 0), TopicPartition("events", 1), TopicPartition("items", 0)
    consumer = FakeConsumer()
    consumer.assigned = {a0, a1, b0}
    consumer.highwaters = {a0: 100, a1: 50}
    consumer.positions = {a0: 90, a1: 50, b0: 3}
    source, _, _ = make_source(consumer)
    assert source.lag() == {"events": 10}


class FakeProducer:
    def __init__(self, fail_with=None):
        self.sent = []
        self.fail_with = fail_with
        self.futures = []

    def send(self, topic, key=None, value=None, headers=None):
        self.sent.append((topic, key, value, headers))
        future = Future()
        self.futures.append(future)
        return future

    def flush(self, timeout=None):
        for future in self.futures:
            if self.fail_with is None:
                future.success(None)
            else:
                future.failure(self.fail_with)
        self.futures = []


def test_vector_sink_sends_pairs_and_flushes():
    producer = FakeProducer()
    sink = VectorSink(producer, "vectors")
    sink.write_batch([(b"user:1", b"{}"), (b"item:2", b"{}")])
    sink.flush(1.0)
    assert [(t, k, v) for t, k, v, _ in producer.sent] == [("vectors", b"user:1", b"{}"),
                                                          ("vectors", b"item:2", b"{}")]


def test_delivery_failure_surfaces_in_flush():
    sink = VectorSink(FakeProducer(fail_with=KafkaTimeoutError("expired")), "vectors")
    sink.write_batch([(b"user:1", b"{}")])
    with pytest.raises(BrokerError, match="1 record"):
        sink.flush(1.0)
    sink.flush(1.0)  # errors are reported once


def test_dead_letter_keeps_original_bytes_and_headers():
    producer = FakeProducer()
    sink = DeadLetterSink(producer, "events.dlq")
    raw = SourceRecord("events", 2, 41, b"user-7", b"\xffnot json", 5, ())
    null = SourceRecord("events", 0, 3, None, None, 5, ())
    sink.write_batch([(BadRecord("invalid_utf8", raw.value, "bad byte"), raw),
                      (BadRecord("empty_record", b"", "tombstone"), null)])
    sink.flush(1.0)
    (topic, key, value, headers), (_, null_key, null_value, _) = producer.sent
    assert (topic, key, value) == ("events.dlq", b"user-7", b"\xffnot json")
    assert dict(headers) == {"reason": b"invalid_utf8", "detail": b"bad byte", "source_topic": b"events",
                             "source_partition": b"2", "source_offset": b"41"}
    assert (null_key, null_value) == (None, b"")
