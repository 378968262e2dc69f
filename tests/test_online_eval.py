"""Live quality: events ranked before they are applied, as P1 ranks a test user, and the gauges."""

from __future__ import annotations

import json

import numpy as np
import pytest

from learners.evaluation.protocol import top_k, user_metrics
from learners.evaluation.event_rank import NO_RANK, ranks_from_scores
from learners.learner import ContinualRecommender, LearnerConfig
from learners.synthetic import SyntheticWorld
from stream.config import default_model_path
from stream.metrics import WorkerMetrics
from stream.worker.online_eval import OnlineEval, RollingMean
from worker_fakes import TP0, FakeLearner, consumer_record, make_worker

K = 10


def test_rank_excludes_history_and_breaks_ties_by_row():
    scores = np.array([[5.0, 9.0, 5.0, 1.0, 7.0]])
    history_rows, history_weights = np.array([[1, 0]]), np.array([[0.6, 0.0]])  # row 1 seen; place 2 empty
    assert ranks_from_scores(scores.copy(), np.array([2]), history_rows, history_weights)[0] == 2  # 4, 0 ahead
    assert ranks_from_scores(scores.copy(), np.array([1]), history_rows, history_weights)[0] == NO_RANK
    assert ranks_from_scores(scores.copy(), np.array([7]), history_rows, history_weights)[0] == NO_RANK


def test_rolling_mean_keeps_the_last_window():
    rolling = RollingMean(3)
    rolling.extend(np.array([1.0, 0.0]))
    assert rolling.mean == pytest.approx(0.5)
    rolling.extend(np.array([1.0, 1.0, 1.0]))
    assert rolling.mean == pytest.approx(1.0)
    rolling.extend(np.array([0.0]))
    assert rolling.mean == pytest.approx(2 / 3)


def offline_p1(scores, targets, history_rows, history_weights) -> tuple[list, list]:
    """P1 step 3 for one-item truths ([users, items] scores), with the protocol's own ranking code."""
    recalls, ndcgs = [], []
    for user_scores, target, rows, weights in zip(scores, targets, history_rows, history_weights):
        known = set(rows[weights > 0].tolist())
        if target >= len(user_scores) or target in known:
            continue
        scores = user_scores.astype(np.float64)
        scores[list(known)] = -np.inf
        ranked = top_k(scores[None, :], K)[0]
        recall, ndcg = user_metrics(ranked, np.array([target]), K)
        recalls.append(recall)
        ndcgs.append(ndcg)
    return recalls, ndcgs


def test_live_figures_match_offline_p1_on_the_same_events_and_vectors(monkeypatch):
    import stream.worker.online_eval as online_eval
    monkeypatch.setattr(online_eval, "SCORES_PER_EVENT", 10**9)  # every user's first event: no sampling
    monkeypatch.setattr(online_eval, "TIME_SHARE", 10**9)  # and no batch skipped for time
    world = SyntheticWorld(n_items=80, n_users=30, seed=11)
    config = LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=32, negatives=32,
                           batch_size=32, history_length=16, max_text_tokens=24, replay_size=256,
                           replay_batch=16, seed=3)
    learner = ContinualRecommender(config)
    learner.add_items(world.items())
    metrics = WorkerMetrics()
    live = OnlineEval(learner, metrics, window=100_000)
    events = list(world.events(1500))
    offline = {"model": ([], []), "popularity": ([], [])}
    for start in range(0, len(events), 50):
        batch = events[start:start + 50]
        firsts = list({e.user_id: e for e in reversed(batch)}.values())  # each user's first event
        with learner.lock:
            rows_of = [learner.catalogue.existing_row(e.item_id) for e in firsts]
            targets = np.array([10**9 if row is None else row for row in rows_of])
            rows, weights = learner.user_histories([e.user_id for e in firsts])
            items = learner.item_vectors()
            users = learner.user_vectors_from(rows, weights)
            popularity = learner.model.popularity.detach()[:len(items), 1].numpy()  # half-life: one catalogue
            for scorer, scores in {"model": users @ items.T,
                                   "popularity": np.broadcast_to(popularity, (len(firsts), len(items)))}.items():
                recalls, ndcgs = offline_p1(scores, targets, rows, weights)
                offline[scorer][0].extend(recalls)
                offline[scorer][1].extend(ndcgs)
            live.score(batch)
            learner.observe_many(batch)
        if start % 200 == 150:
            learner.learn()
    assert learner.model_version >= 5
    scored = len(offline["model"][0])
    assert scored > 300 and metrics.online_scored._value.get() == scored  # noqa: SLF001
    for scorer, (recalls, ndcgs) in offline.items():
        assert metrics.online_recall.labels(scorer=scorer)._value.get() == pytest.approx(np.mean(recalls))  # noqa: SLF001
        assert metrics.online_ndcg.labels(scorer=scorer)._value.get() == pytest.approx(np.mean(ndcgs))  # noqa: SLF001
    assert np.mean(offline["model"][1]) > 0  # the synthetic users' tastes are learnable


def test_scoring_keeps_to_its_share_of_the_time(monkeypatch):
    import stream.worker.online_eval as online_eval
    clock = [0.0]
    monkeypatch.setattr(online_eval.time, "perf_counter", lambda: clock[0])
    live = OnlineEval.__new__(OnlineEval)
    live._debt_s, live._last = 0.0, 0.0  # noqa: SLF001 - the budget alone
    scored = []

    def costly(events):  # every scoring takes 10 ms
        clock[0] += 0.010
        scored.append(events)
        return {}

    live._score = costly  # noqa: SLF001
    for batch in range(1000):  # a batch every 20 ms of other work: 20 s
        clock[0] += 0.020
        live.score([batch])
    assert 0.01 * 20 <= 0.010 * len(scored) <= online_eval.TIME_SHARE * 21  # about 2 % of the time


def test_a_large_catalogue_scores_a_bounded_uniform_sample(monkeypatch):
    import stream.worker.online_eval as online_eval
    monkeypatch.setattr(online_eval, "SCORES_PER_EVENT", 10)
    live = OnlineEval.__new__(OnlineEval)
    live._rng = np.random.default_rng(0)  # noqa: SLF001 - the sampler alone
    events = [type("E", (), {"user_id": f"u{i}", "item_id": "x"})() for i in range(1000)]
    chosen = live._sample(events, 100)  # noqa: SLF001 - share 10 / 100 of 1000 users, capped per batch
    assert len(chosen) == online_eval.MAX_PER_BATCH and chosen == sorted(chosen)
    assert len(live._sample(events[:200], 100)) == pytest.approx(20, abs=12)  # noqa: SLF001


def test_the_worker_ranks_events_before_applying_them(tmp_path):
    world = SyntheticWorld(n_items=20, n_users=10, seed=2)
    config = LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=16, negatives=8,
                           batch_size=16, history_length=8, max_text_tokens=16, replay_size=64, seed=1)
    learner = ContinualRecommender(config)
    learner.add_items(world.items())
    records = [consumer_record(i, json.dumps(e._asdict()).encode())
               for i, e in enumerate(world.events(80))]
    polls = [{TP0: records[:40]}, {TP0: records[40:]}]
    worker, _, _ = make_worker(tmp_path, polls, learner=learner)
    assert worker.ingest.online_eval is not None and learner.guard_tolerance == 0.1
    for _ in range(2):
        worker.turn()
    assert worker.metrics.online_scored._value.get() > 0  # noqa: SLF001


def test_undone_updates_are_counted(tmp_path):
    learner = FakeLearner()
    worker, _, _ = make_worker(tmp_path, learner=learner)
    assert worker.ingest.online_eval is None  # a stand-in learner has no model to rank with
    learner.allow_training = True
    learner.observed.append(object())
    learner.rollbacks = 2
    worker.trainer.train()
    assert worker.metrics.model_rollbacks.labels(reason="quality")._value.get() == 2  # noqa: SLF001
