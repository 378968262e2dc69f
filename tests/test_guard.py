"""The update guard: a harmful update is undone whole, a clean stream keeps its updates."""

from __future__ import annotations

import logging

import numpy as np
import torch

from learners.learner import ContinualRecommender, LearnerConfig
from learners.synthetic import SyntheticWorld
from stream.config import default_model_path

WORLD = SyntheticWorld(n_items=150, n_users=60, seed=5)
EVENTS = list(WORLD.events(3000))
ITEMS = WORLD.items()


def make_learner(tolerance: float = 0.1) -> ContinualRecommender:
    config = LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=32, negatives=32,
                           batch_size=32, history_length=16, max_text_tokens=24, replay_size=256,
                           replay_batch=16, refresh_per_update=8, seed=7, serving_average=0.9)
    learner = ContinualRecommender(config)
    learner.add_items(ITEMS)
    learner.guard_updates(tolerance)
    return learner


def state_of(learner) -> dict[str, torch.Tensor]:
    """Everything an undo must put back: weights, Adam moments, EWC, serving average."""
    out = {f"w/{n}": p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    optimizer = learner.parts.strategy.optimizer
    for name, param in learner.parts.strategy.optimized_param_id.items():
        for key, value in optimizer.state.get(param, {}).items():
            out[f"opt/{name}/{key}"] = value.clone()
    for key, value in learner.parts.ewc.state().items():
        out[f"ewc/{key}"] = value.clone()
    for key, value in learner.average.shadow.items():  # what it chose by ranking the events stays
        out[f"avg/{key}"] = value.clone()
    return out


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        rows = min(len(value), len(other)) if value.dim() else None  # id tables may have grown
        if rows is not None:
            value, other = value[:rows], other[:rows]
        if key.startswith("ewc/importance"):  # rows the update never reached: divided back by the decay
            torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-12, msg=key)
        else:
            assert torch.equal(other, value), key


def warm_up(learner, experiences: int = 10, size: int = 200) -> int:
    """A model past its first swings (young models move by more than a tenth both ways)."""
    for i in range(experiences):
        for event in EVENTS[i * size:(i + 1) * size]:
            learner.observe(event)
        assert learner.learn() is not None
    return experiences * size


def spike_learning_rate(learner, factor: float) -> None:
    """The test hook: every optimizer group's learning rate times ``factor`` (negative: gradient ascent)."""
    for group in learner.parts.strategy.optimizer.param_groups:
        group["lr"] *= factor


def test_a_harmful_update_is_undone_whole(caplog):
    learner = make_learner()
    seen = warm_up(learner)
    assert learner.rollbacks == 0
    learner.items_to_publish()
    before, version = state_of(learner), learner.model_version
    served_items = learner.item_vectors().copy()
    for event in EVENTS[seen:seen + 600]:
        learner.observe(event)
    spike_learning_rate(learner, -500.0)
    with caplog.at_level(logging.WARNING, logger="learners.learner"):
        report = learner.learn(max_samples=200)  # the other 400 wait: the events it is judged on
    spike_learning_rate(learner, -1 / 500.0)
    assert learner.rollbacks == 1
    assert report.model_version == learner.model_version == version + 2  # never back, never reused
    assert_same_state(before, state_of(learner))
    assert any("undone" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # The vectors served afterwards are the previous weights': their learned part points where it did
    # (the popularity coordinates and the trending one follow the counts, which moved on).
    model_dim = learner.model.dim
    after_items = learner.item_vectors()
    cosine = np.einsum("nd,nd->n", served_items[:, :model_dim], after_items[:, :model_dim]) / (
        np.linalg.norm(served_items[:, :model_dim], axis=1) * np.linalg.norm(after_items[:, :model_dim], axis=1))
    assert cosine.min() > 0.9999
    assert learner.pending == 400  # nothing lost, nothing trained twice
    assert learner.learn() is not None and learner.rollbacks == 1  # and training goes on


def test_an_update_with_no_newer_events_is_judged_before_the_next_trains():
    learner = make_learner()
    seen = warm_up(learner)
    version = learner.model_version
    for event in EVENTS[seen:seen + 200]:
        learner.observe(event)
    spike_learning_rate(learner, -500.0)
    learner.learn()
    spike_learning_rate(learner, -1 / 500.0)
    assert learner.rollbacks == 0  # nothing newer to judge it on yet
    for event in EVENTS[seen + 200:seen + 600]:
        learner.observe(event)
    report = learner.learn()
    assert learner.rollbacks == 1
    assert report.model_version == version + 3  # the spiked one, the undo, the next update


def test_a_clean_stream_keeps_its_updates():
    learner = make_learner()
    updates = 0
    for start in range(0, 3000, 100):
        for event in EVENTS[start:start + 100]:
            learner.observe(event)
        if learner.learn(max_samples=60) is not None:
            updates += 1
    assert updates >= 25
    assert learner.rollbacks <= 0.01 * updates


def test_without_the_guard_nothing_is_undone():
    learner = make_learner()
    learner.guard_tolerance = 1.0  # no score drops by more than all of it
    seen = warm_up(learner)
    for event in EVENTS[seen:seen + 600]:
        learner.observe(event)
    spike_learning_rate(learner, -500.0)
    learner.learn(max_samples=200)
    assert learner.rollbacks == 0


def test_an_update_is_worse_beyond_the_tolerance_and_beyond_noise():
    from learners.continual.guard import update_is_worse
    rng = np.random.default_rng(0)
    before = rng.uniform(0.2, 0.6, 200)
    assert update_is_worse(before, before * 0.8, 0.1)  # 20 % lower on every event
    assert not update_is_worse(before, before * 0.95, 0.1)  # within the tolerance
    noisy = before * 0.88 + rng.normal(0, 0.4, 200)  # 12 % lower on average, but noise of +-0.4 an event
    assert not update_is_worse(before[:20], noisy[:20], 0.1)
