"""The learner before it has seen anything: publishing must work, not crash."""

from __future__ import annotations

import numpy as np
import pytest

from learners.learner import ContinualRecommender, LearnerConfig
from stream.config import default_model_path

pytestmark = pytest.mark.integration  # loads the real model (a few seconds)


def test_a_fresh_learner_publishes_no_items_and_gives_any_user_a_unit_vector():
    learner = ContinualRecommender(LearnerConfig(model_path=default_model_path(), device="cpu",
                                                 train_layers=0, vector_dim=16, negatives=8))
    assert learner.item_vectors().shape == (0, 16)
    ids, vectors = learner.items_to_publish()
    assert ids == [] and vectors.shape == (0, 16)
    users = learner.user_vectors(["never-seen"])
    assert users.shape == (1, 16) and np.linalg.norm(users[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("tower", ["sum", "attention"])
def test_both_user_towers_train_publish_unit_vectors_and_restore_exactly(tmp_path, tower):
    from learners.checkpoint import CheckpointStore
    from learners.synthetic import SyntheticWorld

    config = LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=16, negatives=8,
                           history_length=8, batch_size=16, replay_size=64, replay_batch=8, user_tower=tower)
    world = SyntheticWorld(n_items=30, n_users=6)
    learner = ContinualRecommender(config)
    learner.add_items(world.items())
    for event in world.events(120):
        learner.observe(event)
    assert learner.learn().samples > 0
    users = learner.user_vectors(["user-0", "user-1", "never-seen"])
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(learner.item_vectors(), axis=1), 1.0, atol=1e-5)
    store = CheckpointStore(tmp_path)
    store.save(learner)
    restored = ContinualRecommender(config)
    assert store.load_latest(restored) is not None
    np.testing.assert_array_equal(restored.user_vectors(["user-0", "user-1"]), users[:2])
    np.testing.assert_array_equal(restored.item_vectors(), learner.item_vectors())
