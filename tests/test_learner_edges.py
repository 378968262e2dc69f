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
