"""Explanations (the heaviest history items published with a user's vector, the one closest to each
pick) and diversity (maximal marginal relevance, intra-list similarity), on hand-made vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from learners.state.explain import heaviest_items
from stream import ranking
from stream.kafka.messages import decode_vector, encode_vectors
from stream.vector_index import VectorIndex
from test_vector_index import FakeConsumer, Record, encode, unit


def test_heaviest_items_sums_an_items_weight_over_its_events_and_orders_per_user():
    ids = ["a", "b", "c", "d"]
    rows = np.array([[1, 2, 1, 1, 0],    # b three times (0.1 each) outweighs c's single 0.25
                     [3, 0, 0, 0, 0],    # one item
                     [0, 0, 0, 0, 0]])   # empty history: row 0, weight 0
    weights = np.array([[0.1, 0.25, 0.1, 0.1, 0.45],
                        [1.0, 0, 0, 0, 0],
                        [0, 0, 0, 0, 0]], np.float32)
    got = heaviest_items(ids, rows, weights, n=2)
    assert [[item for item, _ in user] for user in got] == [["a", "b"], ["d"], []]
    assert got[0][1][1] == pytest.approx(0.3, abs=1e-4) and got[1] == [("d", 1.0)]
    assert heaviest_items(ids, rows[:0], weights[:0]) == []


def test_because_goes_out_in_the_payload_and_the_index_reads_it():
    records = encode_vectors("user", ["u1", "u2"], np.eye(2), 3, 1.0,
                             [{"because": [{"item_id": "a", "weight": 0.7}, {"item_id": "b", "weight": 0.3}]}, None])
    payloads = [decode_vector(value)["payload"] for _, value in records]
    assert payloads[0]["because"][0] == {"item_id": "a", "weight": 0.7} and "because" not in payloads[1]
    index = VectorIndex()
    for _, value in records:
        assert index.apply(value)
    malformed = json.loads(records[1][1])
    malformed["payload"]["because"] = "not a list"
    malformed["payload"]["model_version"] = 4
    assert index.apply(json.dumps(malformed).encode())  # the vector still counts; the field is ignored
    assert index.explain("u2", ["a"]) == [None]


def _index_with(user_vec, items: dict, because=()) -> VectorIndex:
    index = VectorIndex(use_faiss=False)
    value = json.loads(encode("user", "u", user_vec, 1))
    if because:
        value["payload"]["because"] = [{"item_id": item, "weight": 0.5} for item in because]
    index.apply(json.dumps(value).encode())
    for item, vec in items.items():
        index.apply(encode("item", item, vec, 1))
    return index


def test_each_pick_is_explained_by_the_history_item_closest_to_it():
    items = {"sci-fi-seen": [1, 0, 0.1], "drama-seen": [0, 1, 0.1],
             "sci-fi-new": [0.9, 0.1, 0.2], "drama-new": [0.1, 0.95, 0.2], "other": [0, 0, 1]}
    index = _index_with([0.7, 0.7, 0.1], items, because=["sci-fi-seen", "drama-seen", "gone-from-index"])
    reasons = index.explain("u", ["sci-fi-new", "drama-new", "unknown"])
    assert [r and r[0] for r in reasons] == ["sci-fi-seen", "drama-seen", None]
    a, b = np.array(items["sci-fi-new"]), np.array(items["sci-fi-seen"])
    assert reasons[0][1] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-5)
    assert _index_with([1, 0, 0], items).explain("u", ["other"]) == [None]  # no because published


def test_diversity_zero_is_exactly_the_plain_ranking():
    rng = np.random.default_rng(7)
    index = VectorIndex(use_faiss=False)
    index.apply(encode("user", "u", unit(rng, 8), 1))
    for n in range(120):
        index.apply(encode("item", f"i{n}", unit(rng, 8), 1))
    index.apply(encode("item", "twin", index.item_vector("i3"), 1))  # a tie in score
    plain = index.topk("u", k=20, exclude=["i5"])
    assert index.topk("u", k=20, exclude=["i5"], diversity=0.0) == plain
    scores = np.array([s for _, s in index.topk("u", k=121)])
    assert ranking.mmr(scores, np.ones((len(scores), 2)), 20, 0.0) == list(range(20))
    diverse = index.topk("u", k=20, exclude=["i5"], diversity=0.6)
    assert len(diverse) == 20 and diverse != plain and diverse[0] == plain[0]
    assert "i5" not in {i for i, _ in diverse}
    ils = [index.intra_list_similarity([i for i, _ in picks]) for picks in (plain, diverse)]
    assert ils[1] < ils[0]


def test_mmr_trades_a_near_duplicate_for_a_different_item():
    vectors = np.array([[1, 0], [0.99, 0.14], [0.6, 0.8], [0, 1]])
    scores = np.array([0.9, 0.89, 0.7, 0.5])
    assert ranking.mmr(scores, vectors, 3, 0.0) == [0, 1, 2]
    assert ranking.mmr(scores, vectors, 3, 0.6) == [0, 3, 2]  # the near-copy of the first goes last
    assert ranking.intra_list_similarity(vectors[[0, 3]]) == pytest.approx(0.0)
    assert ranking.intra_list_similarity(vectors[[0, 0, 0]]) == pytest.approx(1.0)
    assert ranking.intra_list_similarity(vectors[:1]) == 0.0
    with pytest.raises(ValueError):
        ranking.mmr(scores, vectors, 3, 1.5)


def test_topk_command_json_with_explanations_and_diversity(monkeypatch):
    from stream import vector_index
    from stream.cli import main

    user = json.loads(encode("user", "u", [0.8, 0.5, 0.1], 1))
    user["payload"]["because"] = [{"item_id": "seen", "weight": 1.0}]
    items = {"seen": [1, 0, 0], "a": [0.9, 0.3, 0], "a-twin": [0.95, 0.2, 0], "b": [0, 1, 0]}
    records = [Record(b"user:u", json.dumps(user).encode())] + [
        Record(f"item:{item}".encode(), encode("item", item, vec, 1)) for item, vec in items.items()]
    class Consumer(FakeConsumer):
        def close(self):
            pass

    monkeypatch.setattr(vector_index, "open_consumer", lambda *a, **k: Consumer({"v-0": records}))
    args = ["topk", "--user", "u", "--bootstrap-servers", "127.0.0.1:1", "--k", "2"]
    plain = json.loads(CliRunner().invoke(main, args + ["--json"]).output)
    assert [p["item_id"] for p in plain["picks"]] == ["a", "a-twin"] and "because" not in plain["picks"][0]
    assert plain["picks"][0]["score"] == pytest.approx(0.87)
    a, twin = np.array(items["a"]), np.array(items["a-twin"])
    assert plain["intra_list_similarity"] == pytest.approx(a @ twin / np.linalg.norm(a) / np.linalg.norm(twin),
                                                           abs=1e-5)
    explained = json.loads(CliRunner().invoke(main, args + ["--json", "--explain", "--diversity", "0.8"]).output)
    assert [p["item_id"] for p in explained["picks"]] == ["a", "b"]
    assert explained["picks"][0]["because"] == {"item_id": "seen", "similarity": pytest.approx(0.9 / np.hypot(0.9, 0.3),
                                                                                              abs=1e-5)}
    assert explained["intra_list_similarity"] < plain["intra_list_similarity"]
    text = CliRunner().invoke(main, args + ["--explain"])
    assert text.exit_code == 0 and text.output.splitlines()[0].startswith("1\ta\t") and "because seen" in text.output
    assert CliRunner().invoke(main, args + ["--diversity", "2"]).exit_code == 2


@pytest.mark.integration  # loads the real model (a few seconds)
def test_a_learners_published_user_explains_a_pick_by_the_item_that_shaped_it():
    from learners.state.explain import top_history_items
    from learners.learner import ContinualRecommender, LearnerConfig
    from learners.records import Event
    from learners.synthetic import SyntheticWorld
    from stream.config import default_model_path

    learner = ContinualRecommender(LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=16,
                                                 negatives=8, history_length=8, batch_size=16))
    learner.add_items(SyntheticWorld(n_items=30, n_users=4).items())
    history = [("item-5", "favourite"), ("item-9", "click"), ("item-5", "favourite"), ("item-12", "click")]
    for n, (item, kind) in enumerate(history):
        learner.observe(Event(f"e{n}", "fan", item, kind, float(n)))
    learner.observe(Event("e9", "other", "item-1", "click", 9.0))
    because = top_history_items(learner, ["fan", "other", "never-seen"])
    assert [item for item, _ in because[0]] == ["item-5", "item-12", "item-9"]  # two favourites; then the newer
    assert because[0][0][1] > 0.7 and because[1] == [("item-1", 1.0)] and because[2] == []

    index = VectorIndex(use_faiss=False)
    extras = [{"because": [{"item_id": i, "weight": w} for i, w in items]} for items in because[:1]]
    for _, value in encode_vectors("user", ["fan"], learner.user_vectors(["fan"]), 1, 1.0, extras):
        index.apply(value)
    for _, value in encode_vectors("item", learner.catalogue.ids, learner.item_vectors(), 1, 1.0):
        index.apply(value)
    picks = [item for item, _ in index.topk("fan", k=5)] + ["item-9"]
    reasons = index.explain("fan", picks)
    assert reasons[-1] == ("item-9", pytest.approx(1.0, abs=1e-5))  # a history item explains itself
    vectors = {i: index.item_vector(i) for i in ["item-5", "item-9", "item-12"]}
    for pick, (reason, similarity) in zip(picks, reasons):
        sims = {i: float(index.item_vector(pick) @ v) for i, v in vectors.items()}
        assert reason == max(sims, key=sims.get) and similarity == pytest.approx(sims[reason], abs=1e-5)
