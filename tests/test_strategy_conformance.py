"""Every evaluation strategy through one tiny stream, and the online-Fisher EWC plugin on its own.

The conformance test drives every strategy (the peers popularity, decayed_pop,
ease and ease_rw, frozen, naive, ewc, replay, ewc_replay, avalanche_ewc_replay,
joint) through ``evaluate`` with the real default
model and a tiny learner configuration, then checks the results file against
docs/formats.md. The EWC test needs no model folder.
"""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learners.continual.ewc import OnlineFisherEWC

STRATEGY_NAMES = ("popularity", "decayed_pop", "ease", "ease_rw", "frozen", "naive", "ewc", "replay",
                  "ewc_replay", "avalanche_ewc_replay", "joint")
TRAINING = ("naive", "ewc", "replay", "ewc_replay", "avalanche_ewc_replay", "joint")
TEXTS = [
    "Toy Story (1995) | Adventure|Animation|Children|Comedy|Fantasy",
    "Jumanji (1995) | Adventure|Children|Fantasy",
    "Heat (1995) | Action|Crime|Thriller",
    "GoldenEye (1995) | Action|Adventure|Thriller",
    "Casino (1995) | Crime|Drama",
    "Sense and Sensibility (1995) | Drama|Romance",
    "Babe (1995) | Children|Drama",
    "Clueless (1995) | Comedy|Romance",
    "Se7en (1995) | Mystery|Thriller",
    "The Usual Suspects (1995) | Crime|Mystery|Thriller",
    "Braveheart (1995) | Action|Drama|War",
    "Apollo 13 (1995) | Adventure|Drama|IMAX",
]


def _write_stream(folder) -> tuple[str, str]:
    """12 items with texts, 300 events of 10 users (each with a taste for a few items)."""
    rng = random.Random(7)
    items = folder / "items.jsonl"
    items.write_text("".join(json.dumps({"item_id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    tastes = {u: rng.sample(range(len(TEXTS)), 5) for u in range(10)}
    lines = []
    for k in range(300):
        user = rng.randrange(10)
        item = rng.choice(tastes[user]) if rng.random() < 0.8 else rng.randrange(len(TEXTS))
        kind = rng.choice(["click", "purchase", "favourite"])
        lines.append(json.dumps({"event_id": f"e{k}", "user_id": f"u{user}", "item_id": str(item),
                                 "event_type": kind, "ts": 1.0e9 + k}) + "\n")
    events = folder / "events.jsonl"
    events.write_text("".join(lines))
    return str(events), str(items)


@pytest.mark.integration
def test_every_strategy_writes_a_conforming_results_file(tmp_path):
    from learners.evaluation.runner import evaluate
    from learners.evaluation.strategies import ALL_STRATEGIES, make_factory
    from learners.learner import LearnerConfig
    from stream.config import default_model_path

    assert set(ALL_STRATEGIES) == set(STRATEGY_NAMES)
    events, items = _write_stream(tmp_path)
    config = LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=32, history_length=16,
                           batch_size=32, negatives=16, replay_size=200, replay_batch=8,
                           refresh_per_update=8, text_batch=8, seed=3)
    out = tmp_path / "results.json"
    evaluate(events, items, out, blocks=4, k=5, strategies=list(STRATEGY_NAMES),
             factory=make_factory(config, experience_size=40, joint_epochs=2), show_progress=False)

    results = json.loads(out.read_text())
    assert {"protocol", "blocks", "k", "events", "items", "strategies"} <= results.keys()
    assert (results["protocol"], results["blocks"], results["k"]) == ("P1", 4, 5)
    assert (results["events"], results["items"]) == (300, len(TEXTS))
    assert list(results["strategies"]) == list(STRATEGY_NAMES)
    for name, entry in results["strategies"].items():
        assert {"recall@5", "ndcg@5", "bwt", "train_seconds", "samples_trained", "per_block"} <= entry.keys(), name
        for key in ("recall@5", "ndcg@5", "bwt", "train_seconds"):
            assert isinstance(entry[key], (int, float)) and math.isfinite(entry[key]), (name, key)
        assert 0.0 <= entry["recall@5"] <= 1.0 and 0.0 <= entry["ndcg@5"] <= 1.0, name
        assert isinstance(entry["samples_trained"], int) and entry["samples_trained"] >= 0
        assert [b["block"] for b in entry["per_block"]] == [1, 2, 3], name
        for block in entry["per_block"]:
            assert {"block", "recall@5", "ndcg@5", "users"} <= block.keys()
            assert math.isfinite(block["recall@5"]) and math.isfinite(block["ndcg@5"])
            assert isinstance(block["users"], int) and block["users"] >= 0
        assert sum(b["users"] for b in entry["per_block"]) > 0, name
    strategies = results["strategies"]
    for name in TRAINING:
        assert strategies[name]["samples_trained"] > 0, name
    # Retrained on everything so far at every block: the costly reference trains the most.
    assert strategies["joint"]["samples_trained"] > strategies["ewc_replay"]["samples_trained"]
    assert strategies["frozen"]["samples_trained"] == 0
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()

    # The serving average is the product's: the single-mechanism strategies publish live weights.
    factory = make_factory(config, experience_size=40)
    names = ("naive", "ewc", "replay", "ewc_replay", "avalanche_ewc_replay")
    averaged = {name: factory(name).learner.average is not None for name in names}
    assert averaged == {"naive": False, "ewc": False, "replay": False, "ewc_replay": True,
                        "avalanche_ewc_replay": True}


# -- OnlineFisherEWC on its own --------------------------------------------------------------------

class _Tiny(nn.Module):
    row_sparse_params = ("emb",)

    def __init__(self, rows: int = 6, sparse: bool = False) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(rows, 3))
        self.lin = nn.Linear(3, 2)
        self.sparse = sparse  # the id table's gradient: sparse (as TwoTower's) or dense

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        return self.lin(F.embedding(rows, self.emb, sparse=self.sparse)).pow(2).sum()


def _experience(ewc: OnlineFisherEWC, model: _Tiny, rows: list[int], steps: int = 3) -> list[float]:
    strategy = SimpleNamespace(model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    penalties = []
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(torch.tensor(rows)).backward()
        ewc.after_backward(strategy)
        penalties.append(ewc.last_penalty)
        optimizer.step()
    ewc.after_training_exp(strategy)
    return penalties


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-grad", "sparse-grad"])
def test_online_fisher_ewc_penalty_anchors_and_grows(sparse):
    torch.manual_seed(0)
    model = _Tiny(sparse=sparse)
    ewc = OnlineFisherEWC(ewc_lambda=10.0, decay_factor=0.5)
    strategy = SimpleNamespace(model=model)

    # First experience: nothing to protect yet.
    assert _experience(ewc, model, [0, 1, 2]) == [0.0, 0.0, 0.0]
    assert set(ewc.importance) == {"emb", "lin.weight", "lin.bias"}
    assert float(ewc.importance["emb"][:3].sum()) > 0
    assert float(ewc.importance["emb"][3:].abs().sum()) == 0  # rows no step reached: no importance
    anchor = {name: value.clone() for name, value in ewc.anchor.items()}

    # Moved off the anchor: a positive penalty whose gradient points back to it.
    with torch.no_grad():
        model.emb[:3] += 0.5
        model.lin.weight += 0.5
    model.zero_grad()
    (0.0 * model.loss(torch.tensor([0]))).backward()  # no task gradient: only the penalty's
    ewc.after_backward(strategy)
    assert ewc.last_penalty > 0
    before = {n: float((p.detach() - anchor[n]).norm()) for n, p in model.named_parameters()}
    with torch.no_grad():
        for param in model.parameters():
            param -= 1e-3 * param.grad
    after = {n: float((p.detach() - anchor[n]).norm()) for n, p in model.named_parameters()}
    assert after["emb"] < before["emb"] and after["lin.weight"] < before["lin.weight"]
    ewc.after_training_exp(strategy)

    # The table grows (new catalogue rows): new rows carry no penalty, old ones keep theirs.
    old_importance = ewc.importance["emb"].clone()
    with torch.no_grad():
        grown = torch.cat([model.emb.detach(), torch.randn(4, 3)])
    model.emb = nn.Parameter(grown)
    penalties = _experience(ewc, model, [1, 7, 9])
    assert all(math.isfinite(p) and p >= 0 for p in penalties)
    assert ewc.importance["emb"].shape == (10, 3) and ewc.anchor["emb"].shape == (10, 3)
    assert float(ewc.importance["emb"][:6].sum()) >= 0.5 * float(old_importance.sum()) - 1e-6  # decayed, kept
    assert float(ewc.importance["emb"][[7, 9]].sum()) > 0  # the new rows trained now count
    assert ewc.state().keys() == {f"{kind}/{name}" for kind in ("importance", "anchor") for name in ewc.importance}
