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


def test_erasing_a_user_removes_history_pending_and_replay_samples_and_checkpoints_hold_none(tmp_path):
    from learners.checkpoint import CheckpointStore
    from learners.state.erasure import erase_user
    from learners.synthetic import SyntheticWorld
    from learners.state.users import owner_tag

    config = LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=16, negatives=8,
                           history_length=8, batch_size=16, replay_size=512, replay_batch=8)
    world = SyntheticWorld(n_items=30, n_users=6)
    learner = ContinualRecommender(config)
    learner.add_items(world.items())
    gone = "erase-me-0042"
    events = [e if e.user_id != "user-3" else e._replace(user_id=gone)
              for e in world.events(200)]
    for event in events[:150]:
        learner.observe(event)
    learner.learn()
    for event in events[150:]:
        learner.observe(event)
    tag = owner_tag(gone)
    assert gone in learner.users and tag in learner.parts.replay.storage_policy.owners().tolist()
    pending_before = learner.pending

    erasure = erase_user(learner, gone)
    assert erasure.history and erasure.replay_samples > 0 and erasure.pending_samples > 0
    assert learner.pending == pending_before - erasure.pending_samples
    assert gone not in learner.users
    assert tag not in learner.parts.replay.storage_policy.owners().tolist()
    assert not erase_user(learner, gone).found  # a second erasure finds nothing
    learner.learn()  # the others' samples still train
    path = CheckpointStore(tmp_path).save(learner, {})
    tag_bytes = tag.to_bytes(8, "little", signed=True)
    for file in path.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert gone.encode() not in data and tag_bytes not in data, file
    restored = ContinualRecommender(config)
    CheckpointStore(tmp_path).load_latest(restored)
    assert gone not in restored.users and tag not in restored.parts.replay.storage_policy.owners().tolist()
    restored.observe(events[-1]._replace(user_id=gone))
    assert len(restored.users.item_rows_of(gone)) == 1  # a later event starts a new history
