"""User histories follow their events partition: the changelog records, choosing a state, adopting it."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch

from learners.encoder import TextEncoder
from learners.learner import ContinualRecommender, LearnerConfig
from learners.records import Event
from learners.synthetic import SyntheticWorld
from learners.state.users import UserHistories, histories_by_id, rings
from stream.config import default_model_path
from stream.kafka.broker import read_topic
from stream.kafka.changelog import LEDGER_KEY, choose, decode_user_state, encode_ledger, encode_user_state
from stream.kafka.clients import KafkaSource
from stream.metrics import WorkerMetrics
from stream.worker.handover import PartitionHandover, RecentIds
from fake_kafka import FakeConsumer
from worker_harness import (WorkerProcess, changelog_histories, committed_offsets, make_topics, produce_events,
                            produce_items)


def record(user: str, through: int, items: list[str]) -> tuple[bytes, bytes]:
    return user.encode(), encode_user_state(through, items, [1.0] * len(items))


# -- the records and the choice ------------------------------------------------

def test_a_state_round_trips_and_foreign_values_are_refused():
    key, value = record("u1", 7, ["a", "b"])
    state = decode_user_state(key, value)
    assert (state.user_id, state.through, state.items, state.weights) == ("u1", 7, ("a", "b"), (1.0, 1.0))
    for bad in (b"not json", b'{"v": 2, "through": 1, "items": [], "weights": []}',
                b'{"v": 1, "through": 1, "items": ["a"], "weights": []}', b'{"v": 1, "items": [3], "weights": [1]}'):
        assert decode_user_state(b"u1", bad) is None


def test_choose_takes_the_newest_state_at_or_below_the_start():
    records = [(LEDGER_KEY, encode_ledger(4, np.array([1, 2]))), (LEDGER_KEY, encode_ledger(9, np.array([2, 3]))),
               (LEDGER_KEY, encode_ledger(14, np.array([3, 4]))),
               record("u1", 5, ["a"]), record("u1", 10, ["a", "b"]), record("u1", 14, ["a", "b", "c"]),
               record("u2", 12, ["x"]),  # written past the start only: a worker died before committing it
               record("u3", 3, ["y"]), (b"u3", None),  # erased
               (None, b"no key"), (b"u4", b"garbage")]
    chosen = choose(records, start=10)
    assert {user: state.items for user, state in chosen.users.items()} == {"u1": ("a", "b")}
    assert (chosen.ahead, chosen.unreadable) == (1, 2) and chosen.ledger.tolist() == [2, 3]
    assert choose(records, start=20).users["u1"].items == ("a", "b", "c")


# -- the history ring ---------------------------------------------------------------

def test_rings_give_the_kept_events_oldest_first_and_replace_rebuilds_them():
    users = UserHistories(length=4, max_users=10)
    for seq, row in enumerate([1, 2, 3, 4, 5, 6]):
        users.append("u", row, float(row), seq)
    users.append("v", 7, 2.0, 6)
    found = rings(users.state(), ["u", "v", "nobody"])
    assert {k: (r.tolist(), w.tolist()) for k, (r, w) in found.items()} == \
        {"u": ([3, 4, 5, 6], [3.0, 4.0, 5.0, 6.0]), "v": ([7], [2.0])}
    rows, weights = found["u"]
    other = UserHistories(length=4, max_users=10)
    other.append("u", 9, 1.0, 0)  # what the new owner held of the user before: replaced
    other.replace("u", rows, weights, first_seq=100)
    assert [a.tolist() for a in rings(other.state(), ["u"])["u"]] == [rows.tolist(), weights.tolist()]
    slots = np.array([users.slot_of("u")]), np.array([other.slot_of("u")])
    for got, want in zip(other.histories(slots[1]), users.histories(slots[0])):
        np.testing.assert_array_equal(got, want)
    assert histories_by_id(users.state(), [f"i{r}" for r in range(8)], ["v"]) == {"v": (["i7"], [2.0])}


@pytest.mark.integration
def test_a_learner_adopts_what_another_exported_and_publishes_the_same_user_vector():
    config = LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=32, negatives=32,
                           batch_size=32, history_length=16, max_text_tokens=24, train_layers=1, seed=7)
    encoder = TextEncoder(config.model_path, config.train_layers, config.max_text_tokens, torch.device("cpu"))
    world = SyntheticWorld(n_items=40, n_users=10, seed=4)
    first, second = ContinualRecommender(config, encoder=encoder), ContinualRecommender(config, encoder=encoder)
    for learner in (first, second):
        learner.add_items(world.items())
    first.observe_many(list(world.events(300)))
    users = sorted({e.user_id for e in world.events(300)})
    exported = first.export_histories(users + ["nobody"])
    assert sorted(exported) == users
    assert second.adopt_histories(exported) == len(users) and second.pending == 0  # nothing to train again
    assert second.export_histories(users) == exported
    # Same weights (same seed, untrained) and the same histories: the same published vectors.
    np.testing.assert_allclose(second.user_vectors(users), first.user_vectors(users), atol=1e-6)


# -- the worker part, on fakes -----------------------------------------------------------

def test_recent_ids_keep_the_newest_in_order():
    recent = RecentIds(capacity=4)
    recent.extend(np.array([1, 2, 3]))
    assert recent.oldest_first().tolist() == [1, 2, 3]
    recent.extend(np.array([4, 5, 6]))
    assert recent.oldest_first().tolist() == [3, 4, 5, 6]
    recent.extend(np.arange(10, 20))
    assert recent.oldest_first().tolist() == [16, 17, 18, 19]


class _Learner:
    def __init__(self):
        self.adopted = []

    def adopt_histories(self, histories):
        self.adopted.append(histories)
        return len(histories)


def test_a_partition_whose_state_this_worker_holds_is_released_without_reading_the_changelog(tmp_path):
    from stream.config import Settings

    settings = Settings(bootstrap_servers="127.0.0.1:1", state_dir=tmp_path, metrics_port=0)
    consumer = FakeConsumer(assigned={("events", 0), ("events", 1)})
    events = KafkaSource(consumer, sleep=lambda s: None)
    handover = PartitionHandover(settings, _Learner(), WorkerMetrics(), publisher=None)
    handover._partitions = 2  # noqa: SLF001 - as ``open`` leaves it when the changelog exists
    read = []
    handover._adopt = lambda partition, start, remember: read.append((partition, start))  # noqa: SLF001
    from kafka import TopicPartition

    consumer.assigned = {TopicPartition("events", 0), TopicPartition("events", 1)}
    consumer.positions = {TopicPartition("events", 0): 40, TopicPartition("events", 1): 25}
    handover.hold(events, [("events", 0), ("events", 1)])
    assert consumer.paused() == consumer.assigned  # nothing fetched before the histories are in
    applied = {("events", 0): 40, ("events", 1): 10}
    handover.settle(events, applied, remember_ids=None, not_yet=frozenset({("events", 1)}))
    assert read == [] and consumer.paused() == {TopicPartition("events", 1)}  # its state ends at 40: nothing to read
    handover.settle(events, applied, remember_ids=None)
    assert read == [(1, 25)] and not consumer.paused() and not handover.holding


def test_a_partition_this_worker_holds_past_its_start_keeps_its_histories(tmp_path):
    """Restarted from its own checkpoint at 150 whose commit (100) had not landed: its histories
    hold every event to 150, and 100..150 are read again and skipped. Histories taken from the
    changelog as of 100 would lose those events for good."""
    from kafka import TopicPartition

    from stream.config import Settings

    settings = Settings(bootstrap_servers="127.0.0.1:1", state_dir=tmp_path, metrics_port=0)
    consumer = FakeConsumer(assigned={("events", 0)})
    events = KafkaSource(consumer, sleep=lambda s: None)
    handover = PartitionHandover(settings, _Learner(), WorkerMetrics(), publisher=None)
    handover._partitions = 1  # noqa: SLF001 - as ``open`` leaves it when the changelog exists
    read = []
    handover._adopt = lambda partition, start, remember: read.append((partition, start))  # noqa: SLF001
    consumer.assigned = {TopicPartition("events", 0)}
    consumer.positions = {TopicPartition("events", 0): 100}
    handover.hold(events, [("events", 0)])
    assert handover.settle(events, {("events", 0): 150}, remember_ids=None) == {("events", 0): 100}
    assert read == [] and not consumer.paused() and not handover.holding


# -- the real worker, twice, on the embedded broker --------------------------------------------

@pytest.mark.integration
def test_a_new_worker_carries_on_with_the_histories_of_the_partitions_it_is_given(broker, unique_topic, tmp_path):
    topics = make_topics(broker.bootstrap, unique_topic, partitions=4)
    world = SyntheticWorld(n_items=80, n_users=24, seed=11)
    events = list(world.events(600, id_prefix=f"ho-{uuid.uuid4().hex[:6]}"))
    produce_items(broker.bootstrap, topics.items, world.items())
    produce_events(broker.bootstrap, topics.events, events)
    fast = dict(experience_size=256, checkpoint_interval_s=3, batch_size=32, negatives=32, history_length=64)
    users = sorted({e.user_id for e in events})
    history = {u: [e.item_id for e in events if e.user_id == u][-64:] for u in users}

    first = WorkerProcess(broker.bootstrap, topics, tmp_path / "a", tmp_path / "a.log", **fast)
    try:
        first.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= len(events), 300, "all events")
        assert first.terminate() == 0, first.tail()
    except BaseException:
        first.kill()
        raise
    # What the first worker held of every user is in the changelog, as its events were, oldest first.
    assert changelog_histories(broker.bootstrap, topics.changelog) == {u: tuple(h) for u, h in history.items()}

    extra = Event(f"{events[-1].event_id}-next", users[0], "item-3", "purchase", events[-1].ts + 1.0)
    second = WorkerProcess(broker.bootstrap, topics, tmp_path / "b", tmp_path / "b.log", **fast)  # no state of its own
    try:
        m = second.wait_for(lambda m: m.get("recstream_users_adopted_total", 0) >= len(users), 300, "histories adopted")
        # A new event, and a repeat delivery of one the first worker applied: its ledger came along.
        produce_events(broker.bootstrap, topics.events, [extra, events[-1]])
        done = second.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= 2
                               and m.get("recstream_checkpoints_total", 0) >= 2, 120, "the new events checkpointed")
        assert second.terminate() == 0, second.tail()
    except BaseException:
        second.kill()
        raise
    assert m["recstream_users_adopted_total"] == len(users)
    assert done["recstream_events_duplicate_total"] == 1 and done["recstream_events_valid_total"] == 1
    # The second worker's history of that user is the first one's plus the new event: it carried on.
    carried_on = tuple((history[users[0]] + ["item-3"])[-64:])
    assert changelog_histories(broker.bootstrap, topics.changelog)[users[0]] == carried_on
    key = f"user:{users[0]}".encode()
    vectors = [json.loads(r.value) for r in read_topic(broker.bootstrap, topics.vectors) if r.key == key]
    because = {b["item_id"] for b in vectors[-1]["payload"].get("because", [])}
    assert len(because) > 1 and because <= set(carried_on)  # explained by what it did on the first worker too
    ends = committed_offsets(broker.bootstrap, topics.group, topics.events, range(4))
    assert sum(ends.values()) == len(events) + 2
    assert changelog_histories(broker.bootstrap, topics.changelog)[events[-1].user_id] == \
        tuple((history[events[-1].user_id] + (["item-3"] if events[-1].user_id == users[0] else []))[-64:])
