"""The trending coordinate: busy, barely known items rise in every user's scores, and only they."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from learners.checkpoint.compatibility import check_config
from learners.config import LearnerConfig
from learners.errors import CheckpointError
from learners.statistics.popularity import PopularityLadder
from learners.statistics.trending import EVIDENCE, ITEM_SHARE, TrendingCoordinate


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_the_score_is_the_rest_plus_the_weight_times_the_rising_value():
    users, items = _unit(3, 8, 0), _unit(5, 8, 1)
    rising = np.array([0.0, 0.2, 0.5, 0.9, 1.0], np.float32)
    weight = 0.3
    coordinate = TrendingCoordinate(weight)
    published_users, published_items = coordinate.users(users), coordinate.items(items, rising)
    np.testing.assert_allclose(np.linalg.norm(published_users, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(published_items, axis=1), 1.0, atol=1e-6)
    q = ITEM_SHARE * rising
    z = published_users[0, -1]
    expected = math.sqrt(1 - z * z) * (users @ items.T * np.sqrt(1 - q * q) + weight * rising)
    np.testing.assert_allclose(published_users @ published_items.T, expected, atol=1e-5)


def test_weight_zero_leaves_every_score_as_it_was():
    users, items = _unit(3, 8, 2), _unit(5, 8, 3)
    coordinate = TrendingCoordinate(0.0)
    scores = coordinate.users(users) @ coordinate.items(items, np.ones(5, np.float32)).T
    np.testing.assert_allclose(scores, users @ items.T, atol=1e-6)


def test_a_negative_weight_is_refused():
    with pytest.raises(ValueError, match=">= 0"):
        TrendingCoordinate(-0.1)


def test_rising_favours_few_recent_events_over_old_ones_and_over_well_known_items():
    ladder = PopularityLadder((0.25, 4.0))
    n_items = 400  # the shortest rung halves every 100 events
    counts = torch.zeros(n_items, ladder.rungs, dtype=torch.float64)
    ladder.observe(counts, torch.tensor([1, 1] + [2] * 300), n_items)  # item 1: two old events; 2: well known
    ladder.observe(counts, torch.tensor([3, 3] + [2] * 10), n_items)  # item 3: two recent events
    rising = ladder.rising(counts, n_items, EVIDENCE)
    assert rising[0] == 0  # never seen
    assert rising[3] > rising[1] > 0  # recent beats old at the same count
    assert rising[3] > rising[2]  # a handful of recent events beats a well-known item's many
    assert float(rising.max()) <= 1.0


def test_a_checkpoint_of_the_older_layout_is_refused_with_what_to_do(tmp_path):
    learner = SimpleNamespace(config=LearnerConfig(model_path="model"))
    saved = {"model_path": "model", "vector_dim": 192}  # written before the trending coordinate
    with pytest.raises(CheckpointError, match="older recstream.*--state-dir"):
        check_config(saved, learner, Path(tmp_path) / "v1" / "model.pt")
    check_config({**saved, "trending_weight": 0.5}, learner, Path(tmp_path) / "v1" / "model.pt")  # only a log line


@pytest.mark.integration
def test_published_vectors_carry_the_items_values_and_one_user_value():
    from learners.learner import ContinualRecommender
    from learners.synthetic import SyntheticWorld
    from learners.statistics import trending
    from stream.config import default_model_path

    config = LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=16, negatives=8,
                           history_length=8, batch_size=16, replay_size=64, replay_batch=8, trending_weight=0.4)
    world = SyntheticWorld(n_items=30, n_users=6)
    learner = ContinualRecommender(config)
    learner.add_items(world.items())
    for event in world.events(120):
        learner.observe(event)
    learner.learn()
    items = learner.item_vectors()
    rising = learner.model.rising(trending.EVIDENCE).numpy()
    conversion = learner.model.conversion().numpy()
    newness = (learner.model.newness() * learner.model.discount()).numpy()  # new to the stream, by credible users
    assert rising.max() > 0 and newness.max() > 0 and np.abs(conversion).max() > 0
    values = trending.item_value(rising, conversion, newness)
    np.testing.assert_allclose(items[:, -1], ITEM_SHARE * values[: len(items)], atol=1e-6)
    users = learner.user_vectors(["user-0", "user-1", "never-seen"])
    np.testing.assert_allclose(users[:, -1], 0.4 / math.hypot(ITEM_SHARE, 0.4), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
