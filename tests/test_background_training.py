"""The learner used from two threads: the worker's loop publishes user vectors while an
experience trains on the trainer thread (stream.worker, background_training)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from learners.learner import ContinualRecommender, LearnerConfig
from learners.records import Event
from learners.synthetic import SyntheticWorld
from stream.config import default_model_path

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def learner():
    world = SyntheticWorld(n_items=40, n_users=20, seed=5)
    rec = ContinualRecommender(LearnerConfig(model_path=default_model_path(), device="cpu", batch_size=32,
                                             negatives=32, replay_size=200, replay_batch=8))
    rec.add_items(world.items())
    for event in world.events(300):
        rec.observe(event)
    return rec


def test_tables_leave_the_model_alone_while_training_is_in_flight(learner):
    learner.user_vectors(["user-1"])  # fresh tables
    n_items = learner.model.n_items
    learner.training_in_flight = True
    try:
        learner.observe(Event("new-1", "user-1", "an-item-nobody-described", "click", 1.0))
        vectors = learner.user_vectors(["user-1", "user-2"])
    finally:
        learner.training_in_flight = False
    assert learner.model.n_items == n_items  # no grow, no eval()/train() from this thread
    assert vectors.shape == (2, learner.config.vector_dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    learner.user_vectors(["user-1"])
    assert learner.model.n_items == len(learner.catalogue)  # caught up once the update landed


def test_learn_on_a_thread_while_another_observes_and_publishes(learner):
    world = SyntheticWorld(n_items=40, n_users=20, seed=6)
    events = list(world.events(400, id_prefix="bg"))
    version = learner.model_version
    errors: list[BaseException] = []

    def train():
        try:
            learner.learn(max_samples=128)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    trainer = threading.Thread(target=train)
    trainer.start()
    published = 0
    while trainer.is_alive() or published == 0:
        for event in events[published * 20:(published + 1) * 20]:
            with learner.lock:
                learner.observe(event)
        with learner.lock:
            vectors = learner.user_vectors([e.user_id for e in events[:20]])
        assert np.isfinite(vectors).all()
        published += 1
        time.sleep(0.01)
    trainer.join()
    assert not errors, errors
    assert learner.model_version == version + 1
    assert learner.pending > 0  # what the loop observed meanwhile waits for the next experience
