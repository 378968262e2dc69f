"""VectorIndex: newest vector per entity wins, top-k equals a brute-force dot-product ranking."""

from __future__ import annotations

import json
import uuid
from collections import namedtuple

import numpy as np
import pytest

from stream import vector_index
from stream.vector_index import VectorIndex


def encode(kind: str, entity_id: str, vector, model_version: int, updated_at: float = 1_763_860_000.0) -> bytes:
    """A vectors-topic value as docs/formats.md describes it, built by hand."""
    return json.dumps({
        "collection_name": kind + "s",
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}:{entity_id}")),
        "vector": [float(x) for x in vector],
        "payload": {"entity_type": kind, "entity_id": entity_id,
                    "model_version": model_version, "updated_at": updated_at},
    }).encode("utf-8")


def unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def brute_force(user: np.ndarray, items: dict[str, np.ndarray], k: int, exclude=()) -> list[str]:
    scored = sorted(((float(np.dot(user.astype(np.float64), v.astype(np.float64))), i)
                     for i, v in items.items() if i not in set(exclude)), reverse=True)
    return [i for _, i in scored[:k]]


@pytest.fixture(params=[True, False], ids=["faiss", "numpy"])
def use_faiss(request):
    if request.param and vector_index.faiss is None:
        pytest.skip("faiss is not installed")
    return request.param


def test_newest_model_version_wins():
    index = VectorIndex()
    assert index.apply(encode("user", "42", [1, 0, 0], model_version=3))
    assert not index.apply(encode("user", "42", [0, 1, 0], model_version=2, updated_at=2e9))  # older model
    np.testing.assert_allclose(index.user_vector("42"), [1, 0, 0])
    assert index.apply(encode("user", "42", [0, 0, 1], model_version=4, updated_at=1.0))  # newer model, older clock
    np.testing.assert_allclose(index.user_vector("42"), [0, 0, 1])
    assert index.model_version("user", "42") == 4


def test_same_version_newer_updated_at_wins_and_replay_is_harmless():
    index = VectorIndex()
    first = encode("item", "7", [1, 0], model_version=5, updated_at=100.0)
    second = encode("item", "7", [0, 1], model_version=5, updated_at=101.0)
    assert index.apply(first)
    assert index.apply(second)
    assert not index.apply(first)  # replayed older record
    assert not index.apply(second)  # replayed same record
    np.testing.assert_allclose(index.item_vector("7"), [0, 1])
    assert index.item_ids() == ["7"]


def test_users_and_items_are_separate_namespaces():
    index = VectorIndex()
    index.apply(encode("user", "1", [1, 0], 1))
    index.apply(encode("item", "1", [0, 1], 1))
    np.testing.assert_allclose(index.user_vector("1"), [1, 0])
    np.testing.assert_allclose(index.item_vector("1"), [0, 1])
    assert index.item_ids() == ["1"] and index.user_ids() == ["1"]


@pytest.mark.parametrize("value", [
    b"not json", b"[]", b"{}",
    json.dumps({"vector": [1.0], "payload": {"entity_type": "shop", "entity_id": "1", "model_version": 1}}).encode(),
    json.dumps({"vector": [], "payload": {"entity_type": "user", "entity_id": "1", "model_version": 1}}).encode(),
    json.dumps({"vector": [1.0], "payload": {"entity_type": "user", "entity_id": "", "model_version": 1}}).encode(),
    json.dumps({"vector": [1.0], "payload": {"entity_type": "user", "entity_id": "1", "model_version": "1"}}).encode(),
    json.dumps({"vector": ["a"], "payload": {"entity_type": "user", "entity_id": "1", "model_version": 1}}).encode(),
])
def test_malformed_records_are_skipped(value):
    index = VectorIndex()
    assert not index.apply(value)
    assert index.rejected == 1 and len(index) == 0


def test_tombstone_removes_entity():
    index = VectorIndex()
    index.apply(encode("item", "9", [1, 0], 1))
    index.apply(encode("user", "u", [1, 0], 1))
    assert index.topk("u") == [("9", pytest.approx(1.0))]
    assert index.apply(None, key=b"item:9")
    assert index.item_ids() == [] and index.topk("u") == []


def test_topk_matches_brute_force_with_exclude(use_faiss):
    rng = np.random.default_rng(7)
    dim, n_items = 32, 300
    index = VectorIndex(use_faiss=use_faiss)
    items = {f"i{n}": unit(rng, dim) for n in range(n_items)}
    for item_id, v in items.items():
        index.apply(encode("item", item_id, v, model_version=1))
    users = {f"u{n}": unit(rng, dim) for n in range(20)}
    for user_id, v in users.items():
        index.apply(encode("user", user_id, v, model_version=1))

    for user_id, u in users.items():
        got = index.topk(user_id, k=10)
        assert [i for i, _ in got] == brute_force(u, items, 10)
        for item_id, score in got:
            assert score == pytest.approx(float(np.dot(u, items[item_id])), abs=1e-5)
        exclude = {i for i, _ in got[:3]} | {"i0", "not-an-item"}
        got_ex = index.topk(user_id, k=10, exclude=exclude)
        assert [i for i, _ in got_ex] == brute_force(u, items, 10, exclude)
        assert not exclude & {i for i, _ in got_ex}

    # newer item vectors replace the old ones in the (lazily rebuilt) index
    target = "u0"
    best = index.topk(target, k=1)[0][0]
    items[best] = -users[target]
    index.apply(encode("item", best, items[best], model_version=2))
    assert [i for i, _ in index.topk(target, k=10)] == brute_force(users[target], items, 10)
    assert best not in {i for i, _ in index.topk(target, k=10)}


def test_topk_edge_cases(use_faiss):
    index = VectorIndex(use_faiss=use_faiss)
    assert index.topk("nobody") == []
    index.apply(encode("user", "u", [1, 0], 1))
    assert index.topk("u") == []  # no items yet
    index.apply(encode("item", "a", [1, 0], 1))
    index.apply(encode("item", "b", [0, 1], 1))
    assert [i for i, _ in index.topk("u", k=10)] == ["a", "b"]  # k larger than the catalogue
    assert index.topk("u", k=0) == []
    assert index.topk("u", k=5, exclude=["a", "b"]) == []


Record = namedtuple("Record", "key value")


class FakeConsumer:
    """Enough of kafka-python's KafkaConsumer for catch_up: two partitions, small polls."""

    def __init__(self, partitions: dict[str, list[Record]]):
        self.logs = partitions
        self.positions = {tp: 0 for tp in partitions}

    def assignment(self):
        return set(self.logs)

    def end_offsets(self, partitions):
        return {tp: len(self.logs[tp]) for tp in partitions}

    def position(self, tp):
        return self.positions[tp]

    def poll(self, timeout_ms=0, max_records=None):
        out = {}
        for tp, log in self.logs.items():
            start = self.positions[tp]
            batch = log[start:start + 2]
            if batch:
                out[tp] = batch
                self.positions[tp] += len(batch)
        return out


def test_catch_up_reads_every_partition_to_its_end():
    p0 = [Record(b"user:1", encode("user", "1", [1, 0], v)) for v in range(1, 6)]
    p1 = [Record(b"item:a", encode("item", "a", [0, 1], 1)), Record(b"item:b", encode("item", "b", [1, 0], 1)),
          Record(b"item:a", None)]
    consumer = FakeConsumer({"vectors-0": p0, "vectors-1": p1})
    index = VectorIndex()
    assert index.catch_up(consumer, timeout_s=5)
    assert index.model_version("user", "1") == 5
    assert index.item_ids() == ["b"]
    assert index.topk("1") == [("b", pytest.approx(1.0))]


@pytest.mark.integration
def test_follows_a_real_topic_from_the_beginning(broker, unique_topic):
    from kafka import KafkaProducer

    from stream.kafka.broker import ensure_topics
    from stream.vector_index import open_consumer

    topic = unique_topic("vectors")
    ensure_topics(broker.bootstrap, {topic: 3}, compacted={topic})
    producer = KafkaProducer(bootstrap_servers=[broker.bootstrap])
    rng = np.random.default_rng(3)
    items = {}
    for version in (1, 2):
        for n in range(40):
            items[f"i{n}"] = unit(rng, 16)
            producer.send(topic, key=f"item:i{n}".encode(), value=encode("item", f"i{n}", items[f"i{n}"], version))
    user = unit(rng, 16)
    producer.send(topic, key=b"user:u", value=encode("user", "u", user, 2))
    producer.flush()
    producer.close()

    consumer = open_consumer(broker.bootstrap, topic)
    try:
        index = VectorIndex()
        assert index.catch_up(consumer, timeout_s=30)
        assert len(index.item_ids()) == 40 and index.model_version("item", "i5") == 2
        assert [i for i, _ in index.topk("u", k=5)] == brute_force(user, items, 5)
    finally:
        consumer.close()


def test_topk_on_an_unreachable_broker_says_so_in_one_line():
    import socket

    from click.testing import CliRunner

    from stream.cli import main

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(main, ["topk", "--user", "1", "--bootstrap-servers", f"127.0.0.1:{port}",
                                       "--timeout", "1"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach Kafka" in lines[0], result.output
