"""Forget requests on fakes: parsed, applied once between experiences, a tombstone sent, counted,
checkpointed at once, and bad requests dead-lettered with a reason."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from stream.kafka.forget import encode_forget, parse_forget
from stream.kafka.recovery import dead_letter_source
from worker_fakes import TP0, FakeItems, consumer_record, event_bytes, gauge, make_worker, skip_checkpoint_files


def forget_record(offset: int, key, value=None):
    if value is None and isinstance(key, bytes):
        value = json.dumps({"user_id": key.decode("utf-8", "replace"), "requested_at": 1.0}).encode()
    return SimpleNamespace(topic="forget", partition=0, offset=offset, key=key, value=value,
                           timestamp_ms=0, headers=[])


def test_parse_forget_takes_the_key_and_names_what_is_wrong():
    key, value = encode_forget("user-7", requested_at=5.0)
    assert (key, json.loads(value)) == (b"user-7", {"user_id": "user-7", "requested_at": 5.0})
    assert parse_forget(key, value) == "user-7"
    assert parse_forget(b"user-7", None) == "user-7"  # the value is informational
    assert parse_forget(b"user-7", b"not json") == "user-7"
    reasons = {
        "no key": (None, value), "empty key": (b"", value), "not UTF-8": (b"\xff\xfe", value),
        "blank": (b"  ", b""), "control char": (b"a\nb", b""), "too long": (b"u" * 300, b""),
        "other user": (b"user-8", value),
    }
    got = {name: getattr(parse_forget(*args), "reason", None) for name, args in reasons.items()}
    assert got == {"no key": "missing_key", "empty key": "missing_key", "not UTF-8": "invalid_utf8",
                   "blank": "empty_id", "control char": "bad_id_chars", "too long": "id_too_long",
                   "other user": "id_mismatch"}


def _sent(producer):
    """(key, value, headers) of what reached the fake Kafka, in order."""
    return [(key, value, headers) for _, key, value, headers in producer.sent]


def test_a_forget_request_erases_the_user_once_sends_a_tombstone_and_checkpoints_at_once(tmp_path):
    events = [consumer_record(i, event_bytes(i)) for i in range(14)]  # users u0..u6
    worker, consumer, producer = make_worker(tmp_path, [{TP0: events}])
    skip_checkpoint_files(worker)
    worker.turn()  # the events applied; their users wait for the publish window
    assert "u3" in worker.learner.users and worker.publisher.has_queued_users
    assert not worker.checkpointer.due()

    forget = FakeItems([forget_record(0, b"u3")])
    worker.consumers.forget = forget
    worker.turn()
    worker.checkpointer.collect(wait=True)
    assert "u3" not in worker.learner.users
    assert all(e.user_id != "u3" for e in worker.learner.observed)  # its pending samples too
    assert gauge(worker.metrics.users_erased) == 1
    sent = _sent(producer)
    assert (b"user:u3", None, None) in sent  # the tombstone
    assert [k for k, v, _ in sent if k == b"user:u3" and v is not None] == []  # its queued vector dropped
    assert {k for k, v, _ in sent if v is not None} == {f"user:u{i}".encode() for i in range(7) if i != 3}
    # The erasure was checkpointed at once.
    assert not worker.checkpointer.due()
    assert consumer.commits, "the checkpoint after the erasure committed"

    # Read again (a checkpoint restored later holds offset 1): nothing more is erased or sent.
    worker.forgetting.restore({0: 1})
    before = len(producer.sent)
    worker.turn()
    worker.checkpointer.collect(wait=True)
    assert gauge(worker.metrics.users_erased) == 1 and len(producer.sent) == before


def test_forget_offsets_go_into_the_checkpoint_and_a_restart_reads_on_from_them(tmp_path):
    worker, _, producer = make_worker(tmp_path, [{TP0: [consumer_record(0, event_bytes(3))]}])
    saved = []  # the fake learner has no files to save: keep what the checkpoint's extra says
    worker.checkpointer.store.prepare = lambda learner, extra: saved.append(extra)
    worker.checkpointer.store.write = lambda prepared, **_: None
    worker.consumers.forget = FakeItems([forget_record(0, b"u3"), forget_record(1, b"nobody")])
    worker.turn()
    worker.checkpointer.collect(wait=True)
    assert [list(p) for p in saved[-1]["forget_offsets"]] == [[0, 2]]
    assert gauge(worker.metrics.users_erased) == 2  # a user never seen: a tombstone all the same
    assert [k for k, v, _ in _sent(producer) if v is None] == [b"user:u3", b"user:nobody"]

    again, _, _ = make_worker(tmp_path / "again", [])
    again.checkpointer.store.load_latest = lambda learner: saved[-1]
    assert again.checkpointer.restore()
    assert again.forgetting.start == {0: 2}


def test_bad_forget_requests_are_dead_lettered_with_a_reason_and_the_rest_applied(tmp_path):
    worker, _, producer = make_worker(tmp_path, [{TP0: [consumer_record(i, event_bytes(i)) for i in range(7)]}])
    skip_checkpoint_files(worker)
    worker.turn()
    worker.consumers.forget = FakeItems([forget_record(0, None, b'{"user_id": "u1"}'),
                                         forget_record(1, b"\xff\xfe"),
                                         forget_record(2, b"u2", b'{"user_id": "u5"}'),
                                         forget_record(3, b"u4")])
    worker.turn()
    worker.checkpointer.collect(wait=True)
    dead = {dict(h)["reason"].decode(): dead_letter_source(h) for _, _, h in _sent(producer) if h}
    assert dead == {"missing_key": ("forget", 0, 0), "invalid_utf8": ("forget", 0, 1),
                    "id_mismatch": ("forget", 0, 2)}
    counted = worker.metrics.dead_lettered
    assert counted.labels(reason="missing_key")._value.get() == 1  # noqa: SLF001
    assert worker.totals.dead_lettered == 0  # not events
    assert set(worker.learner.users) == {"u0", "u1", "u2", "u3", "u5", "u6"}  # only u4 erased
    assert gauge(worker.metrics.users_erased) == 1


def test_no_erasure_while_an_experience_trains(tmp_path):
    worker, _, producer = make_worker(tmp_path, [{TP0: [consumer_record(0, event_bytes(3))]}])
    skip_checkpoint_files(worker)
    worker.turn()
    worker.consumers.forget = FakeItems([forget_record(0, b"u3")])
    worker.trainer.train = lambda: None  # noqa: E731 - stays "training" for the next turn
    worker.trainer._training = True  # noqa: SLF001 - an experience in flight
    worker.turn()
    assert "u3" in worker.learner.users and gauge(worker.metrics.users_erased) == 0
    worker.trainer._training = False  # noqa: SLF001 - collected
    worker.turn()
    assert "u3" not in worker.learner.users and gauge(worker.metrics.users_erased) == 1


@pytest.mark.parametrize("user", ["", "a\nb"])
def test_forget_command_refuses_an_invalid_id_in_one_line(user):
    from stream.cli import main

    result = CliRunner().invoke(main, ["forget", "--user", user, "--bootstrap-servers", "127.0.0.1:1",
                                       "--timeout", "1"])
    assert result.exit_code != 0
    assert "not a valid user id" in result.output and "Traceback" not in result.output


def test_forget_command_says_in_one_line_when_kafka_is_unreachable():
    from stream.cli import main

    result = CliRunner().invoke(main, ["forget", "--user", "u1", "--bootstrap-servers", "127.0.0.1:1",
                                       "--timeout", "1"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach Kafka" in lines[0], result.output


def test_a_missing_forget_topic_is_looked_for_again_and_said_at_most_every_30_s(monkeypatch, caplog):
    import logging

    from stream.kafka import items as items_module
    from stream.kafka.items import ItemsFollower

    class NoTopic:
        calls = 0

        def partitions_for_topic(self, topic):
            self.calls += 1
            return None

    clock = [1000.0]
    monkeypatch.setattr(items_module.time, "monotonic", lambda: clock[0])
    consumer = NoTopic()
    follower = ItemsFollower(consumer, "forget", name="forget", retry_s=5, warn_s=30)
    with caplog.at_level(logging.WARNING, logger="stream.kafka.items"):
        for _ in range(13):  # one minute, a try every 5 s
            assert follower.next_batch() == []
            clock[0] += 5
    said = [r for r in caplog.records if "forget topic 'forget' not found" in r.getMessage()]
    assert consumer.calls == 13 and len(said) == 3  # at 0, 30 and 60 s


def test_events_after_the_erasure_start_a_new_history_and_a_new_vector(tmp_path):
    later = consumer_record(20, json.dumps({"event_id": "late", "user_id": "u3", "item_id": "i1",
                                            "event_type": "click", "ts": 99.0}).encode())
    worker, _, producer = make_worker(tmp_path, [{TP0: [consumer_record(3, event_bytes(3))]}, {}, {TP0: [later]}])
    skip_checkpoint_files(worker)
    worker.turn()
    worker.consumers.forget = FakeItems([forget_record(0, b"u3")])
    worker.turn()
    worker.checkpointer.collect(wait=True)
    assert "u3" not in worker.learner.users
    worker.turn()
    worker.publisher.publish_queued_users(force=True)
    worker.publisher.deliver()
    assert "u3" in worker.learner.users and [e.event_id for e in worker.learner.observed] == ["late"]
    u3 = [v for k, v, _ in _sent(producer) if k == b"user:u3"]
    assert u3[-2] is None and u3[-1] is not None  # the tombstone, then the new vector
