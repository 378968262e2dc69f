"""Results file (docs/formats.md), Markdown table, plot, and the runner end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from learners.errors import ConfigError
from learners.evaluation.files import write_events, write_items
from learners.evaluation.protocol import BlockScore, SliceScore, StrategyResult
from learners.evaluation.report import (markdown_table, stability_axes, write_plot, write_results,
                                        write_stability_plot)
from learners.evaluation.runner import evaluate
from learners.records import Event, Item

STRATEGY_KEYS = {"recall@10", "ndcg@10", "bwt", "train_seconds", "samples_trained", "cold", "per_block"}
SCENARIO_SLICES = {"retention": SliceScore(0.3, 0.35, 4), "plasticity": SliceScore(0.1, 0.12, 9),
                   "novel": SliceScore(0.05, 0.06, 2)}


def _result(name: str, bwt: float | None = -0.01, slices: dict | None = None) -> StrategyResult:
    per_block = [BlockScore(1, 0.2, 0.25, 6), BlockScore(2, 0.1, 0.15, 22)]
    return StrategyResult(name=name, k=10, recall=0.15, ndcg=0.2, bwt=bwt, train_seconds=1.5,
                          samples_trained=1234, per_block=per_block, r_diag={}, r_end={},
                          slices=slices or {})


def test_results_json_has_exactly_the_contract_shape(tmp_path: Path):
    path = tmp_path / "results.json"
    written = write_results(path, blocks=3, k=10, events=100, items=20,
                            strategies={"popularity": _result("popularity"),
                                        "ewc_replay": _result("ewc_replay")})
    loaded = json.loads(path.read_text())
    assert loaded == written
    assert set(loaded) == {"protocol", "blocks", "k", "events", "items", "strategies"}
    assert (loaded["protocol"], loaded["blocks"], loaded["k"]) == ("P1", 3, 10)
    assert (loaded["events"], loaded["items"]) == (100, 20)
    assert list(loaded["strategies"]) == ["popularity", "ewc_replay"]
    for strategy in loaded["strategies"].values():
        assert set(strategy) == STRATEGY_KEYS
        assert strategy["recall@10"] == 0.15 and strategy["bwt"] == -0.01
        assert strategy["samples_trained"] == 1234
        assert strategy["per_block"][0] == {"block": 1, "recall@10": 0.2, "ndcg@10": 0.25,
                                            "users": 6}


def test_results_file_holds_returning_active_and_the_scenario_slices(tmp_path: Path):
    slices = {"returning": SliceScore(0.4, 0.5, 7), "active": SliceScore(0.1, 0.2, 30), **SCENARIO_SLICES}
    write_results(tmp_path / "r.json", blocks=18, k=10, events=100, items=20, scenario="recurring",
                  strategies={"naive": _result("naive", slices=slices)})
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["scenario"] == "recurring"
    naive = loaded["strategies"]["naive"]
    assert set(naive) == STRATEGY_KEYS | set(slices)
    assert naive["returning"] == {"ndcg@10": 0.5, "recall@10": 0.4, "users": 7}
    assert naive["active"] == {"ndcg@10": 0.2, "recall@10": 0.1, "users": 30}
    assert naive["retention"] == {"ndcg@10": 0.35, "recall@10": 0.3}
    assert naive["plasticity"] == {"ndcg@10": 0.12, "recall@10": 0.1}
    assert naive["novel"] == {"ndcg@10": 0.06, "recall@10": 0.05}
    table = markdown_table(loaded).splitlines()
    assert "| strategy | returning | active | retention | plasticity | novel |" in table
    assert "| naive | 0.5000 (7) | 0.2000 (30) | 0.3500 | 0.1200 | 0.0600 |" in table
    assert stability_axes(loaded) == ("plasticity", "retention")
    del naive["retention"]
    assert stability_axes(loaded) == ("p1", "returning")
    png = write_stability_plot(tmp_path / "s.png", loaded)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_key_names_follow_k(tmp_path: Path):
    result = _result("popularity")
    result.k = 5
    loaded = write_results(tmp_path / "r.json", blocks=3, k=5, events=1, items=1,
                           strategies={"popularity": result})
    strategy = loaded["strategies"]["popularity"]
    assert "recall@5" in strategy and "ndcg@5" in strategy["per_block"][0]
    with pytest.raises(ValueError):
        write_results(tmp_path / "r.json", blocks=3, k=10, events=1, items=1,
                      strategies={"popularity": result})


def test_markdown_table_and_plot(tmp_path: Path):
    results = write_results(tmp_path / "r.json", blocks=3, k=10, events=100, items=20,
                            strategies={"popularity": _result("popularity"),
                                        "frozen": _result("frozen", bwt=None)})
    table = markdown_table(results)
    lines = table.splitlines()
    assert lines[2] == "| strategy | Recall@10 | NDCG@10 | BWT | P1-cold NDCG@10 | train s | samples trained |"
    assert "| popularity | 0.1500 | 0.2000 | -0.0100 | 0.0000 | 1.5 | 1234 |" in lines
    assert "| frozen | 0.1500 | 0.2000 | n/a | 0.0000 | 1.5 | 1234 |" in lines
    png = write_plot(tmp_path / "r.png", results)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Constant:
    """A learner stand-in the caller's factory builds: scores by item id order."""

    name = "constant"

    def __init__(self) -> None:
        self.samples_trained, self.train_seconds = 0, 0.0

    def add_items(self, items):
        pass

    def learn(self, events):
        self.samples_trained += len(events)

    def freeze_users(self, user_ids):
        return list(user_ids)

    def scores(self, users, item_ids):
        return np.tile(-np.arange(len(item_ids), dtype=float), (len(users), 1))


def _factory(name: str):
    if name == "constant":
        return _Constant()
    raise KeyError(name)


def test_evaluate_end_to_end(tmp_path: Path):
    events = [Event(f"e{i}", f"u{i % 4}", f"i{(i * 7) % 11}", "click", float(i))
              for i in range(60)]
    write_events(tmp_path / "events.jsonl", events)
    write_items(tmp_path / "items.jsonl", [Item(f"i{n}", f"item {n}") for n in range(9)])
    with (tmp_path / "events.jsonl").open("ab") as handle:
        handle.write(b"not json\n")  # counted and skipped, not fatal
    out = tmp_path / "out" / "results.json"
    results = evaluate(tmp_path / "events.jsonl", tmp_path / "items.jsonl", out, blocks=3, k=10,
                       strategies=["popularity", "constant"], factory=_factory,
                       show_progress=False)
    assert json.loads(out.read_text()) == results
    assert (results["events"], results["items"]) == (60, 11)  # i9, i10 only in events
    assert list(results["strategies"]) == ["popularity", "constant"]
    assert results["strategies"]["constant"]["samples_trained"] == 60
    assert len(results["strategies"]["popularity"]["per_block"]) == 2
    assert out.with_suffix(".png").is_file()
    assert "| constant |" in out.with_suffix(".md").read_text()
    assert (out.parent / "results-stability.png").is_file()
    constant = results["strategies"]["constant"]
    assert set(constant) == STRATEGY_KEYS | {"returning", "active"}  # no scenario slices under time
    assert constant["returning"]["users"] + constant["active"]["users"] == sum(
        b["users"] for b in constant["per_block"])
    assert "scenario" not in results


def test_evaluate_recurring_writes_retention_and_plasticity(tmp_path: Path):
    genres = {"a": "Action", "c": "Comedy", "d": "Drama"}
    items = [Item(f"{g}{i}", f"Film {g}{i} (1999) | {genre}") for g, genre in genres.items() for i in range(8)]
    events = [Event(f"e{t}", f"u{t % 2}", f"{'acd'[t % 3]}{(t // 3) % 8}", "click", float(t))
              for t in range(72)]
    write_events(tmp_path / "events.jsonl", events)
    write_items(tmp_path / "items.jsonl", items)
    out = tmp_path / "results.json"
    results = evaluate(tmp_path / "events.jsonl", tmp_path / "items.jsonl", out, k=10,
                       strategies=["popularity", "constant"], factory=_factory, show_progress=False,
                       scenario="recurring")
    assert (results["scenario"], results["blocks"]) == ("recurring", 18)  # the scenario's own default
    for strategy in results["strategies"].values():
        assert len(strategy["per_block"]) == 17
        for name in ("retention", "plasticity", "novel"):
            assert set(strategy[name]) == {"ndcg@10", "recall@10"}
            assert 0.0 <= strategy[name]["ndcg@10"] <= 1.0
        assert set(strategy["returning"]) == {"ndcg@10", "recall@10", "users"}
    assert "| popularity |" in out.with_suffix(".md").read_text().split("by slice")[1]
    assert (tmp_path / "results-stability.png").is_file()
    with pytest.raises(ConfigError, match="too few"):
        evaluate(tmp_path / "events.jsonl", tmp_path / "items.jsonl", out, blocks=8, k=10,
                 strategies=["popularity"], factory=_factory, show_progress=False, scenario="recurring")


def test_evaluate_rejects_unknown_strategy(tmp_path: Path):
    write_events(tmp_path / "e.jsonl", [Event("e1", "u", "a", "click", 1.0),
                                        Event("e2", "u", "b", "click", 2.0)])
    write_items(tmp_path / "i.jsonl", [])
    with pytest.raises(ConfigError, match="nonsense"):
        evaluate(tmp_path / "e.jsonl", tmp_path / "i.jsonl", tmp_path / "r.json", blocks=2, k=10,
                 strategies=["nonsense"], factory=_factory, show_progress=False)
