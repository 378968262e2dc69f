"""No single record stops the worker: what validation lets through and a later stage still fails
on is set aside (dead-lettered, logged, counted) and the loop goes on, commits included."""

from __future__ import annotations

import json
import numpy as np

from stream.kafka.recovery import dead_letter_source
from worker_fakes import (TP0, FakeItems, FakeLearner, consumer_record, event_bytes, item_record, make_worker,
                          skip_checkpoint_files)

POISON = b'{"event_id":"p","user_id":"\\ud800","item_id":"1","event_type":"click","ts":1.0}'


def dead_letters(producer) -> dict:
    """reason -> sources of the dead-letter records delivered."""
    out: dict = {}
    for _, _, _, headers in producer.sent:
        if headers:
            reason = dict(headers)["reason"].decode()
            out.setdefault(reason, []).append(dead_letter_source(headers))
    return out


def published_users(producer) -> list[str]:
    return sorted(key.decode() for _, key, _, headers in producer.sent if not headers and key.startswith(b"user:"))


def run_and_checkpoint(worker) -> None:
    worker.turn()
    skip_checkpoint_files(worker)
    worker.checkpointer.mark_dirty()
    assert worker.checkpoint()


def assert_totals_add_up(worker) -> None:
    t = worker.totals
    assert t.consumed == t.valid + t.dead_lettered + t.duplicates


def test_a_lone_surrogate_user_id_is_dead_lettered_and_the_offsets_are_committed(tmp_path):
    records = [consumer_record(i, event_bytes(i)) for i in range(3)] + [consumer_record(3, POISON)] \
        + [consumer_record(i, event_bytes(i)) for i in range(4, 6)]
    worker, consumer, producer = make_worker(tmp_path, [{TP0: records}])
    run_and_checkpoint(worker)
    assert dead_letters(producer) == {"bad_id_chars": [("events", 0, 3)]}
    assert published_users(producer) == ["user:u0", "user:u1", "user:u2", "user:u4", "user:u5"]
    assert consumer.commits[-1][TP0].offset == 6
    assert_totals_add_up(worker)


class _FailingLearner(FakeLearner):
    """Fails to apply events of item ``boom`` and to compute the vector of user ``u3``."""

    def observe_many(self, events):
        if any(e.item_id == "boom" for e in events):
            raise RuntimeError("cannot apply")
        super().observe_many(events)

    def user_vectors(self, user_ids):
        vectors = super().user_vectors(user_ids)
        vectors[[u == "u3" for u in user_ids]] = np.nan
        return vectors


def boom_event(i: int) -> bytes:
    return json.dumps({"event_id": f"b{i}", "user_id": "u9", "item_id": "boom", "event_type": "click",
                       "ts": 1.0}).encode()


def test_an_event_the_learner_fails_on_is_dead_lettered_alone(tmp_path):
    records = [consumer_record(0, event_bytes(0)), consumer_record(1, boom_event(1)),
               consumer_record(2, event_bytes(2))]
    worker, consumer, producer = make_worker(tmp_path, [{TP0: records}], learner=_FailingLearner())
    run_and_checkpoint(worker)
    assert dead_letters(producer) == {"apply_failed": [("events", 0, 1)]}
    assert [e.event_id for e in worker.learner.observed] == ["e0", "e2"]  # each applied once
    assert worker.totals.valid == 2 and worker.totals.dead_lettered == 1
    assert worker.metrics.registry.get_sample_value("recstream_record_failures_total", {"stage": "events"}) == 1
    assert consumer.commits[-1][TP0].offset == 3
    assert_totals_add_up(worker)


def test_a_user_vector_that_cannot_be_encoded_is_set_aside_and_the_others_go_out(tmp_path):
    records = [consumer_record(i, event_bytes(i)) for i in range(5)]  # users u0..u4
    worker, consumer, producer = make_worker(tmp_path, [{TP0: records}], learner=_FailingLearner())
    run_and_checkpoint(worker)
    assert published_users(producer) == ["user:u0", "user:u1", "user:u2", "user:u4"]
    assert dead_letters(producer) == {"publish_failed": [("events", 0, 3)]}  # the event behind the vector
    assert worker.totals.valid == 5 and worker.totals.dead_lettered == 0  # applied all the same
    assert worker.metrics.registry.get_sample_value("recstream_record_failures_total",
                                                    {"stage": "user_vectors"}) == 1
    assert consumer.commits[-1][TP0].offset == 5
    assert_totals_add_up(worker)


def item(offset: int, item_id: str, text: str):
    return item_record(offset, json.dumps({"item_id": item_id, "text": text}).encode())


def test_an_item_text_the_encoder_fails_on_is_dead_lettered_and_the_rest_are_added(tmp_path):
    worker, _, producer = make_worker(tmp_path)
    added = []

    def add_items(items):
        if any(item.text == "boom" for item in items):
            raise ValueError("tokenizer refused it")
        added.extend(items)
        return []

    worker.learner.add_items = add_items
    worker.consumers.items = FakeItems([item(0, "a", "Heat"), item(1, "b", "boom"), item(2, "c", "Ran"),
                              item(3, "d", "\ud800 bad text")])
    worker.ingest.read_items()
    assert [item.item_id for item in added] == ["a", "c"]
    assert dead_letters(producer) == {"bad_text_chars": [("items", 0, 3)], "item_failed": [("items", 0, 1)]}
    assert worker.totals.items == 2


class _TextLearner(FakeLearner):
    """Item vectors that follow each item's text, as the text part of the real model does."""

    def __init__(self):
        super().__init__()
        self.texts: dict[str, str] = {}
        self.sent: dict[str, str] = {}

    def add_items(self, items):
        changed = [i.item_id for i in items if self.texts.get(i.item_id) != i.text]
        self.texts.update((i.item_id, i.text) for i in items)
        return changed

    def items_to_publish(self, min_change=0.0):
        moved = [i for i, text in self.texts.items() if self.sent.get(i) != text]
        self.sent.update((i, self.texts[i]) for i in moved)
        vectors = np.array([[1.0, len(self.texts[i]), 0.0, 0.0] for i in moved], np.float32).reshape(-1, 4)
        return moved, vectors


def test_one_item_and_version_name_one_vector_when_texts_move_published_vectors(tmp_path):
    worker, _, producer = make_worker(tmp_path, learner=_TextLearner())
    worker.consumers.items = FakeItems([item(0, "a", "Heat"), item(1, "b", "Ran")])
    worker.ingest.read_items()
    worker.consumers.items = FakeItems([item(2, "a", "Heat (1995) | Crime"), item(3, "c", "Alien")])  # a's text changes
    worker.ingest.read_items()
    worker.publisher.deliver()
    seen: dict = {}
    for _, key, value, _ in producer.sent:
        record = json.loads(value)
        seen.setdefault((key, record["payload"]["model_version"]), set()).add(tuple(record["vector"]))
    assert all(len(vectors) == 1 for vectors in seen.values()), seen
    assert sorted(seen) == [(b"item:a", 0), (b"item:a", 1), (b"item:b", 0), (b"item:c", 1)]
