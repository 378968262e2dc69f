"""The worker's small parts, without Kafka or a model: the de-duplication window, the key
partitioner, the checkpoint snapshot and the user publish window."""

from __future__ import annotations

import json
import random
import threading
from collections import deque

import numpy as np
import pytest
from kafka.partitioner.default import DefaultPartitioner

from learners.state.stream_state import StreamState
from stream.kafka.sinks import KeyCachingPartitioner
from stream.worker.checkpoint_writer import CheckpointWriter, LearnerSnapshot
from stream.worker.dedup import EventLedger, hash_ids


class _ReferenceLedger:
    """The policy spelled out: the newest ``capacity`` distinct ids accepted."""

    def __init__(self, capacity):
        self.capacity, self.order, self.seen = capacity, deque(), set()

    def add(self, event_id):
        if event_id in self.seen:
            return False
        self.seen.add(event_id)
        self.order.append(event_id)
        if len(self.order) > self.capacity:
            self.seen.discard(self.order.popleft())
        return True


@pytest.mark.parametrize("capacity", [1, 2, 7, 100, 1000])
def test_ledger_window_is_exact_across_generations_and_checkpoints(capacity):
    ledger, reference = EventLedger(capacity), _ReferenceLedger(capacity)
    rng = random.Random(capacity)
    for step in range(3000):
        batch = [f"e-{rng.randrange(3 * capacity)}" for _ in range(rng.randrange(1, 25))]
        assert ledger.add_many(batch) == [reference.add(e) for e in batch], step
        if step % 400 == 0:  # through a checkpoint and back
            ledger = EventLedger.from_state(capacity, json.loads(json.dumps(ledger.state())))
        assert len(ledger) == len(reference.seen)


def test_ledger_state_is_compact_and_older_checkpoints_still_load():
    ledger = EventLedger(50_000)
    ids = [f"event-{i}" for i in range(60_000)]
    assert all(ledger.add_many(ids))
    state = ledger.state()
    assert state["format"] == "hash64-v2"
    assert len(state["hashes"]) < 50_000 * 8 * 4 / 3 + 8  # 8 bytes an id, base64
    restored = EventLedger.from_state(50_000, state)
    assert restored.add_many(ids[-3:]) == [False] * 3  # still remembered
    assert restored.add_many(ids[:1]) == [True]  # fell out of the window
    # Checkpoints written before the ledger stored hashes hold the ids themselves.
    legacy = EventLedger.from_state(3, ["a", "b", "c", "d"])
    assert legacy.add_many(["a", "d"]) == [True, False]


def test_ledger_hashes_are_stable_and_distinct():
    # Checkpoints store these values: they must never change between versions or machines.
    ids = ["e-1", "e-2", "", "é" * 3, "x" * 64, "x" * 65, "a\x00"]
    first = hash_ids(ids)
    assert len(set(first.tolist())) == len(ids)
    assert hash_ids(ids[::-1]).tolist() == first.tolist()[::-1]
    assert hash_ids(["a"]).tolist() != hash_ids(["a\x00"]).tolist()
    # An id hashes the same whatever else is in its batch (a repeat arrives beside other ids).
    assert [int(hash_ids([i])[0]) for i in ids] == first.tolist()
    many = hash_ids([f"e-{i}" for i in range(200_000)])
    assert len(np.unique(many)) == len(many)


def test_a_window_saved_with_the_earlier_hash_starts_empty():
    old = {"format": "hash64-v1", "capacity": 10, "hashes": "AAAAAAAAAAA="}
    ledger = EventLedger.from_state(10, old)
    assert len(ledger) == 0 and ledger.add_many(["e-1"]) == [True]


def test_ledger_snapshot_does_not_move_with_the_ledger():
    ledger = EventLedger(10, generation=3)
    ledger.add_many(list("abcde"))
    snapshot = ledger.snapshot()
    ledger.add_many(list("fghijklmn"))
    restored = EventLedger.from_state(10, snapshot.state())
    assert restored.add_many(list("aef")) == [False, False, True]


class _Cluster:
    def __init__(self, n):
        self.n = n

    def topics(self):
        return {"vectors"}

    def partitions_for_topic(self, topic):
        return set(range(self.n))

    def available_partitions_for_topic(self, topic):
        return set(range(self.n))


def test_key_caching_partitioner_agrees_with_kafka_pythons():
    cached, default = KeyCachingPartitioner(max_keys=64), DefaultPartitioner()
    for partitions in (1, 3, 12, 3):  # the partition count changes: the cache follows
        cluster = _Cluster(partitions)
        for i in range(300):
            key = f"user:{i}".encode()
            for _ in range(2):
                assert cached.partition("vectors", None, key, None, None, cluster) == \
                    default.partition("vectors", None, key, None, None, cluster)
    assert len(cached._cache) <= 64


class _Users:
    def __init__(self):
        self.rows = np.zeros((4, 2), np.int64)
        self.ids = ["u0"]

    def state(self):
        return {"user_ids": self.ids, "rows": self.rows[:4], "length": 2}

    def __len__(self):
        return len(self.ids)


class _Catalogue:
    def __init__(self):
        self.ids = ["i0"]

    def state(self):
        return {"ids": self.ids, "texts": [None] * len(self.ids)}

    def __len__(self):
        return 0  # no vector tables to build in this test


class _Learner:
    def __init__(self):
        self.users, self.catalogue = _Users(), _Catalogue()
        self.pending_samples = [(0, 0, 0)]
        self.model_version = 3
        self.lock = threading.RLock()
        self.training_in_flight = False
        self.model = "the live model"

    def snapshot(self):
        return StreamState(self.model_version, 1, list(self.pending_samples), np.zeros((1, 2), np.float32), 0, 0)


def test_learner_snapshot_holds_the_moment_it_was_taken():
    learner = _Learner()
    snapshot = LearnerSnapshot(learner)
    learner.users.rows[0, 0] = 7
    learner.users.ids.append("u1")
    learner.catalogue.ids.append("i1")
    learner.pending_samples.append((1, 1, 1))
    learner.model_version = 4
    assert snapshot.users.state()["rows"][0, 0] == 0 and snapshot.users.state()["user_ids"] == ["u0"]
    assert snapshot.catalogue.state()["ids"] == ["i0"]
    assert snapshot.snapshot().pending == [(0, 0, 0)] and snapshot.model_version == 3
    assert snapshot.model == "the live model"  # what only training changes is read live


def test_checkpoint_writer_holds_the_model_while_preparing_and_writes_beside_training():
    from concurrent.futures import ThreadPoolExecutor

    learner, seen = _Learner(), {}
    prepare_gate, write_gate = threading.Event(), threading.Event()

    class Store:
        def prepare(self, snapshot, extra):
            seen["in_flight_preparing"] = learner.training_in_flight
            seen["extra"] = extra
            seen["version"] = snapshot.model_version
            seen["prepare_thread"] = threading.current_thread().name
            prepare_gate.wait(5)
            return "prepared"

        def write(self, prepared, **_):
            seen["written"] = prepared
            seen["in_flight_writing"] = learner.training_in_flight
            seen["write_thread"] = threading.current_thread().name
            write_gate.wait(5)
            return "ckpt"

    with ThreadPoolExecutor(1, "trainer") as trainer, ThreadPoolExecutor(1, "writer") as writer_pool:
        writer = CheckpointWriter(Store(), learner, trainer, writer_pool)
        job = writer.start({("events", 0): 5}, {"totals": {}}, EventLedger(4).snapshot())
        learner.model_version = 9  # the loop goes on meanwhile
        assert job.holds_learner() and not job.done()
        prepare_gate.set()
        job.prepared.result(5)
        assert not job.holds_learner() and not learner.training_in_flight  # free while the write runs
        assert trainer.submit(lambda: "an experience").result(5) == "an experience"  # trains beside it
        assert not job.done()
        write_gate.set()
        assert job.result() == "ckpt"
    assert seen["in_flight_preparing"] is True and seen["in_flight_writing"] is False
    assert seen["prepare_thread"].startswith("trainer") and seen["write_thread"].startswith("writer")
    assert seen["written"] == "prepared" and seen["version"] == 3 and job.offsets == {("events", 0): 5}
    assert seen["extra"]["ledger"]["hashes"] == "" and "totals" in seen["extra"]


def test_checkpoint_writer_on_one_thread_prepares_first_and_reports_a_failed_prepare():
    from concurrent.futures import ThreadPoolExecutor

    learner, order = _Learner(), []

    class Store:
        def prepare(self, snapshot, extra):
            order.append("prepare")
            raise OSError("disk full")

        def write(self, prepared, **_):
            order.append("write")

    with ThreadPoolExecutor(1) as pool:
        job = CheckpointWriter(Store(), learner, pool, pool).start({}, {}, EventLedger(4).snapshot())
        with pytest.raises(OSError, match="disk full"):
            job.result()
    assert order == ["prepare"] and learner.training_in_flight is False


def test_frozen_startup_objects_are_left_alone_by_the_collector_until_thawed():
    import gc
    import weakref

    from stream.worker import heap

    class Node:
        pass

    node = Node()
    node.self = node  # a cycle: only the cyclic collector can free it
    alive = weakref.ref(node)
    try:
        assert heap.freeze_startup_objects() > 0
        del node
        gc.collect()
        assert alive() is not None  # frozen: full collections no longer walk it
    finally:
        heap.thaw()
    gc.collect()
    assert alive() is None and gc.get_freeze_count() == 0
