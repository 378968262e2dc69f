"""Recommendations leave out what the user already has: the ``recent_items`` published with a user's
vector (bounded by --recent-items), read by ``VectorIndex`` and ``recstream topk``."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from learners.state.explain import BECAUSE_WINDOW, heaviest_items, history_items
from stream.config import Settings
from stream.kafka.messages import decode_vector
from stream.vector_index import MAX_RECENT, VectorIndex
from test_vector_index import FakeConsumer, Record, encode, unit


def _user_record(vector, recent=(), because=()) -> bytes:
    value = json.loads(encode("user", "u", vector, 1))
    if recent:
        value["payload"]["recent_items"] = list(recent)
    if because:
        value["payload"]["because"] = [{"item_id": item, "weight": 0.5} for item in because]
    return json.dumps(value).encode()


def _world(seed: int = 0, n_items: int = 60, dim: int = 8):
    """Items, a user vector pointing at a few of them, and those items as the user's history."""
    rng = np.random.default_rng(seed)
    items = {f"item-{i}": unit(rng, dim) for i in range(n_items)}
    seen = [f"item-{i}" for i in range(0, n_items, 7)]
    user = np.sum([items[i] for i in seen[:4]], axis=0)
    return items, seen, user / np.linalg.norm(user)


def _index(items, user, recent=(), because=(), use_faiss=False) -> VectorIndex:
    index = VectorIndex(use_faiss=use_faiss)
    index.apply(_user_record(user, recent, because))
    for item, vec in items.items():
        index.apply(encode("item", item, vec, 1))
    return index


@pytest.mark.parametrize("use_faiss", [False, True], ids=["numpy", "faiss"])
def test_topk_leaves_out_the_users_items_by_default_and_keeps_them_on_request(use_faiss):
    from stream import vector_index
    if use_faiss and vector_index.faiss is None:
        pytest.skip("faiss is not installed")
    items, seen, user = _world()
    index = _index(items, user, recent=seen[2:], because=seen[:2], use_faiss=use_faiss)
    assert index.seen_items("u") == frozenset(seen) and index.seen_items("nobody") == frozenset()
    for k in (1, 5, len(items)):
        picks = [item for item, _ in index.topk("u", k=k)]
        assert not set(picks) & set(seen) and len(picks) == min(k, len(items) - len(seen))
        assert not {item for item, _ in index.topk("u", k=k, diversity=0.5)} & set(seen)
    kept = [item for item, _ in index.topk("u", k=5, include_seen=True)]
    assert set(kept) & set(seen)  # the user vector points at their own items
    both = [item for item, _ in index.topk("u", k=5, exclude={"item-1"})]
    assert "item-1" not in both and not set(both) & set(seen)


def test_a_malformed_or_oversized_recent_items_field_is_read_safely():
    items, seen, user = _world()
    index = VectorIndex(use_faiss=False)
    value = json.loads(_user_record(user))
    value["payload"]["recent_items"] = "item-0"
    assert index.apply(json.dumps(value).encode())  # the vector counts; the field is ignored
    assert index.seen_items("u") == frozenset()
    value["payload"].update(recent_items=["item-0", 7, None] + [f"x-{i}" for i in range(2 * MAX_RECENT)],
                            model_version=2)
    assert index.apply(json.dumps(value).encode())
    assert "item-0" in index.seen_items("u") and len(index.seen_items("u")) <= MAX_RECENT


def test_topk_command_leaves_out_known_items_unless_include_seen(monkeypatch):
    from stream import vector_index
    from stream.cli import main

    items, seen, user = _world(seed=1)
    records = [Record(b"user:u", _user_record(user, recent=seen))] + [
        Record(f"item:{item}".encode(), encode("item", item, vec, 1)) for item, vec in items.items()]

    class Consumer(FakeConsumer):
        def close(self):
            pass

    monkeypatch.setattr(vector_index, "open_consumer", lambda *a, **k: Consumer({"v-0": records}))
    args = ["topk", "--user", "u", "--bootstrap-servers", "127.0.0.1:1", "--k", "10", "--json"]
    default = CliRunner().invoke(main, args)
    assert default.exit_code == 0, default.output
    picks = [p["item_id"] for p in json.loads(default.output)["picks"]]
    assert len(picks) == 10 and not set(picks) & set(seen)
    kept = CliRunner().invoke(main, args + ["--include-seen"])
    assert kept.exit_code == 0, kept.output
    assert set(p["item_id"] for p in json.loads(kept.output)["picks"]) & set(seen)
    text = CliRunner().invoke(main, args[:-1])
    assert text.exit_code == 0 and not {line.split("\t")[1] for line in text.output.splitlines()} & set(seen)


def test_history_items_lists_distinct_items_newest_first_up_to_the_bound():
    ids = [f"i{r}" for r in range(10)]
    rows = np.array([[3, 5, 3, 7, 5, 9, 1, 0],     # newest first, with repeats
                     [4, 0, 0, 0, 0, 0, 0, 0],     # one event
                     [0, 0, 0, 0, 0, 0, 0, 0]])    # empty history: weight 0 everywhere
    weights = np.array([[.3, .2, .1, .1, .1, .1, .05, .05], [1, 0, 0, 0, 0, 0, 0, 0], [0] * 8], np.float32)
    because, recent = history_items(ids, rows, weights, n=2, recent=4)
    assert recent == [["i3", "i5", "i7", "i9"], ["i4"], []]
    assert because == heaviest_items(ids, rows, weights, n=2)
    assert history_items(ids, rows, weights, recent=0)[1] == [[], [], []]
    assert history_items(ids, rows, weights, recent=100)[1][0] == ["i3", "i5", "i7", "i9", "i1", "i0"]


def test_history_items_reads_past_the_because_window_for_a_longer_recent_list():
    length = 3 * BECAUSE_WINDOW
    ids = [f"i{r}" for r in range(length)]
    rows = np.arange(length)[None, :]
    weights = np.full((1, length), 1.0 / length, np.float32)
    because, recent = history_items(ids, rows, weights, n=3, recent=2 * BECAUSE_WINDOW)
    assert recent[0] == ids[:2 * BECAUSE_WINDOW]
    assert because == heaviest_items(ids, rows, weights, n=3)  # the explanation reads its own window only
    assert history_items(ids, rows, weights, recent=5)[1][0] == ids[:5]


class _Learner:
    """What ``Publisher.publish_users`` reads of a learner."""

    def __init__(self, histories: dict[str, list[int]], n_items: int) -> None:
        self.lock = threading.Lock()
        self.model_version = 1
        self.catalogue = SimpleNamespace(ids=[f"item-{r}" for r in range(n_items)])
        self._histories = histories

    def user_vectors(self, user_ids):
        return np.ones((len(user_ids), 4), np.float32)

    def user_histories(self, user_ids):
        length = max(len(h) for h in self._histories.values())
        rows = np.zeros((len(user_ids), length), np.int64)
        weights = np.zeros((len(user_ids), length), np.float32)
        for i, user in enumerate(user_ids):
            history = self._histories.get(user, [])
            rows[i, :len(history)] = history
            weights[i, :len(history)] = 1.0 / max(len(history), 1)
        return rows, weights


class _Sink:
    def __init__(self) -> None:
        self.records = []

    def write_batch(self, records) -> None:
        self.records.extend(records)


def _published(tmp_path, recent_items: int, histories: dict[str, list[int]]) -> dict[str, dict]:
    from stream.metrics import WorkerMetrics
    from stream.worker.dead_letter_book import DeadLetterBook
    from stream.worker.lifecycle import Lifecycle
    from stream.worker.publisher import Publisher
    from stream.worker.totals import Totals

    settings = Settings(bootstrap_servers="unused:9092", state_dir=tmp_path, recent_items=recent_items)
    metrics = WorkerMetrics()
    publisher = Publisher(settings, _Learner(histories, 100), metrics, Totals(), DeadLetterBook(), Lifecycle(metrics))
    publisher.vectors = _Sink()
    publisher.publish_users(list(histories))
    return {key.decode().removeprefix("user:"): decode_vector(value)["payload"]
            for key, value in publisher.vectors.records}


def test_published_user_vectors_carry_at_most_recent_items_ids(tmp_path):
    long = list(range(60, 0, -1))  # 60 distinct items, newest first
    payloads = _published(tmp_path, 5, {"long": long, "short": [7, 7, 3], "none": []})
    assert payloads["long"]["recent_items"] == [f"item-{r}" for r in long[:5]]
    assert payloads["short"]["recent_items"] == ["item-7", "item-3"]
    assert "recent_items" not in payloads["none"] and "because" not in payloads["none"]
    assert "because" in payloads["long"]
    off = _published(tmp_path, 0, {"long": long})
    assert "recent_items" not in off["long"] and "because" in off["long"]


def test_recent_items_setting_is_bounded():
    assert Settings(bootstrap_servers="x:1").recent_items == 50
    with pytest.raises(ValidationError):
        Settings(bootstrap_servers="x:1", recent_items=1001)
    with pytest.raises(ValidationError):
        Settings(bootstrap_servers="x:1", recent_items=-1)
