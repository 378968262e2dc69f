"""The worker's delivery and recovery rules on fakes (no broker, no model): backpressure,
dead letters never sent twice, output never dropped, model versions never going back."""

from __future__ import annotations

import json

import pytest

from learners.records import BadRecord
from stream.kafka.clients import SourceRecord
from stream.kafka.errors import BrokerError
from stream.kafka.recovery import PublishedVersionMark, dead_letter_source
from stream.kafka.sinks import DeadLetterSink, VectorSink
from stream.worker import publisher
from worker_fakes import TP0, FakeProducer, consumer_record, event_bytes, gauge, make_worker, skip_checkpoint_files


def test_overload_pause_stops_fetching_until_training_catches_up(tmp_path):
    batch = {TP0: [consumer_record(i, event_bytes(i)) for i in range(120)]}
    worker, consumer, _ = make_worker(tmp_path, [batch], overload="pause", max_pending_events=100,
                                      experience_size=50)
    worker.turn()  # 120 events wait, training cannot keep up: fetching pauses
    assert worker.learner.pending == 120
    assert worker.events.paused and consumer.paused_set == {TP0}
    assert gauge(worker.metrics.fetch_paused) == 1

    polls = consumer.poll_calls
    worker.turn()  # still paused, yet still polling: the group membership stays alive
    assert consumer.poll_calls > polls and gauge(worker.metrics.fetch_paused) == 1

    worker.learner.allow_training = True
    worker.turn()  # 120 -> 70: still above experience_size
    assert worker.events.paused and gauge(worker.metrics.fetch_paused) == 1
    worker.turn()  # 70 -> 20: below experience_size, fetching resumes
    assert worker.learner.pending == 20
    assert not worker.events.paused and consumer.paused_set == set()
    assert gauge(worker.metrics.fetch_paused) == 0


def test_overload_sample_never_pauses(tmp_path):
    batch = {TP0: [consumer_record(i, event_bytes(i)) for i in range(120)]}
    worker, consumer, _ = make_worker(tmp_path, [batch], overload="sample", max_pending_events=100,
                                      experience_size=50)
    worker.turn()
    assert not worker.events.paused and gauge(worker.metrics.fetch_paused) == 0


def test_dead_letters_already_sent_before_a_restart_are_not_sent_again(tmp_path):
    batch = {TP0: [consumer_record(5, b"not json"), consumer_record(6, b"also not json"),
                   consumer_record(7, event_bytes(7))]}
    worker, _, producer = make_worker(tmp_path, [batch])
    worker.dead_letter_book.remember([("events", 0, 5)])  # found in the dead-letter topic at start-up
    worker.turn()
    worker.publisher.deliver()  # output is handed to the producer in the turn, delivered by a checkpoint at the latest
    assert [dead_letter_source(headers) for _, _, _, headers in producer.sent if headers] == [("events", 0, 6)]
    assert worker.totals.dead_lettered == 2 and worker.totals.valid == 1 and worker.totals.consumed == 3
    # Once a checkpoint covers their offsets they need not be remembered any longer.
    worker.checkpointer.mark_dirty()
    skip_checkpoint_files(worker)
    assert worker.checkpoint()
    assert worker.dead_letter_book.sent == set()


def test_output_the_broker_refused_is_sent_again_until_delivered(tmp_path):
    batch = {TP0: [consumer_record(0, event_bytes(0)), consumer_record(1, b"bad")]}
    worker, _, producer = make_worker(tmp_path, [batch])
    producer.fail_next = 2  # the user vector and the dead letter both fail once
    worker.turn()
    assert producer.sent == []  # handed to the producer, not yet delivered: the checkpoint waits for it
    skip_checkpoint_files(worker)
    assert worker.checkpoint()
    keys = sorted(key for _, key, _, _ in producer.sent)
    assert keys == [b"k", b"user:u0"]  # each delivered exactly once in the end
    assert worker.metrics.broker_errors.labels(operation="produce")._value.get() >= 1  # noqa: SLF001


def test_sink_parks_refused_records_without_blocking_per_record():
    producer = FakeProducer()
    sink = VectorSink(producer, "vectors")
    producer.refuse = True
    sink.write_batch([(b"a", b"1"), (b"b", b"2"), (b"c", b"3")])
    assert producer.send_calls == 1  # the first refusal parks the rest untried
    with pytest.raises(BrokerError, match="3 record"):
        sink.flush(1.0)
    assert sink.undelivered == 3
    producer.refuse = False
    assert sink.resend() == 3
    sink.flush(1.0)
    assert [key for _, key, _, _ in producer.sent] == [b"a", b"b", b"c"] and sink.undelivered == 0


def test_sink_counts_what_kafka_has_not_acknowledged_yet():
    producer = FakeProducer()
    sink = VectorSink(producer, "vectors")
    sink.write_batch([(b"a", b"1"), (b"b", b"2")])
    assert sink.in_flight == 2
    producer.fail_next = 1
    sink.write_batch([(b"c", b"3")])
    with pytest.raises(BrokerError):
        sink.flush(1.0)
    assert sink.in_flight == 0 and sink.undelivered == 1  # settled: two acknowledged, one parked


def test_dead_letter_sink_tracks_the_offsets_it_wrote():
    producer = FakeProducer()
    sink = DeadLetterSink(producer, "events.dlq")
    raw = SourceRecord("events", 1, 9, b"k", b"x", 5, ())
    sink.write_batch([(BadRecord("not_json", b"x", "d"), raw)] * 3)
    sink.flush(1.0)
    assert sink.next_offsets == {0: 3}


def test_published_version_mark_is_durable_and_only_goes_up(tmp_path):
    mark = PublishedVersionMark(tmp_path / "state")
    assert mark.value == 0
    mark.advance(7)
    mark.advance(3)
    assert mark.value == 7 and PublishedVersionMark(tmp_path / "state").value == 7
    (tmp_path / "state" / PublishedVersionMark.FILE).write_text("garbage")
    assert PublishedVersionMark(tmp_path / "state").value == 0  # unreadable: the checkpoint's version applies


def test_touched_users_are_published_once_per_window_and_before_every_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(publisher, "USER_PUBLISH_WINDOW_S", 3600.0)  # a slow machine stays inside it
    # event_bytes(i) belongs to user u{i % 7}: three events of u0, one of u1, over two polls.
    first = {TP0: [consumer_record(0, event_bytes(0)), consumer_record(1, event_bytes(7))]}
    second = {TP0: [consumer_record(2, event_bytes(14)), consumer_record(3, event_bytes(1))]}
    worker, _, producer = make_worker(tmp_path, [first, second])
    worker.turn()
    worker.turn()  # both polls inside one publish window
    assert producer.futures == [] and producer.sent == []
    skip_checkpoint_files(worker)
    assert worker.checkpoint()  # publishes and delivers what the checkpoint covers first
    assert sorted(key for _, key, _, _ in producer.sent) == [b"user:u0", b"user:u1"]  # u0 once for 3 events
    assert worker.metrics.registry.get_sample_value("recstream_event_to_vector_seconds_count") == 4


def test_user_vectors_never_go_out_before_their_version_is_marked(tmp_path):
    batch = {TP0: [consumer_record(0, event_bytes(0))]}
    worker, _, producer = make_worker(tmp_path, [batch])
    worker.learner.model_version = 12
    worker.turn()
    worker.publisher.publish_queued_users(force=True)  # the publish window is 50 ms
    worker.publisher.deliver()
    assert json.loads(producer.sent[0][2])["payload"]["model_version"] == 12
    assert PublishedVersionMark(tmp_path / "state").value == 12


def test_records_already_applied_are_skipped_and_a_recreated_topic_is_read_as_new(tmp_path):
    # Offsets 0-4 are applied; the partition is fetched again from offset 3 (a rebalance).
    again = {TP0: [consumer_record(o, event_bytes(o)) for o in range(3, 7)]}
    # Then the topic is deleted and created again: its log ends at 2, below the 7 applied.
    recreated = {TP0: [consumer_record(o, event_bytes(100 + o)) for o in range(0, 2)]}
    worker, consumer, _ = make_worker(tmp_path, [again, recreated])
    worker.ingest.apply_offset(("events", 0), 5)
    consumer.highwaters[TP0] = 7
    worker.turn()
    assert [e.event_id for e in worker.learner.observed] == ["e5", "e6"]  # e3 and e4 were applied before
    assert worker.ingest.applied[("events", 0)] == 7 and worker.totals.consumed == 2
    consumer.highwaters[TP0] = 2
    worker.turn()
    assert [e.event_id for e in worker.learner.observed][2:] == ["e100", "e101"]  # not skipped as applied
    assert worker.ingest.applied[("events", 0)] == 2


def test_a_restarted_worker_checkpoints_soon_after_its_first_records_then_at_the_interval(tmp_path):
    import time

    batch = {TP0: [consumer_record(i, event_bytes(i)) for i in range(10)]}
    more = {TP0: [consumer_record(i, event_bytes(i)) for i in range(10, 20)]}
    worker, consumer, _ = make_worker(tmp_path, [batch, more], first_checkpoint_s=0.05)
    skip_checkpoint_files(worker)
    assert not worker.checkpointer.due()  # nothing applied yet: no hurry
    worker.turn()
    time.sleep(0.1)
    worker.turn()  # due: written off the loop
    worker.checkpointer.collect(wait=True)
    assert consumer.commits and consumer.commits[-1][TP0].offset >= 10
    time.sleep(0.1)
    assert not worker.checkpointer.due()  # from now on every checkpoint_interval_s (1000 s here)


def test_a_partition_that_comes_back_after_another_member_moved_it_on_is_never_committed_backwards(tmp_path):
    """This worker applied a partition up to 100 long ago; another member read it on to 500 and
    committed. Assigned it again, a checkpoint before any of its records arrive (an idle partition)
    must commit 500, not the 100 of its old state: the group would read 400 events again."""
    worker, consumer, _ = make_worker(tmp_path, [])
    skip_checkpoint_files(worker)
    worker.ingest.apply_offset(("events", 0), 100)
    consumer.positions[TP0] = 500
    worker.membership.on_assigned([("events", 0)])
    worker.turn()  # the poll returns nothing: the partition is idle
    worker.checkpointer.mark_dirty()
    worker.checkpoint()
    committed = [offsets[TP0].offset for offsets in consumer.commits if TP0 in offsets]
    assert committed and committed[-1] == 500, committed
