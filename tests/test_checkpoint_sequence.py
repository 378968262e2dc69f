"""Checkpoints one store writes over time: the frozen model shard linked, not rewritten, and
checkpoints prepared and written in two halves (as the worker does) while training goes on.

Uses the real default model (all-MiniLM-L6-v2) with a small learner.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from learners.checkpoint import CheckpointStore
from learners.encoder import TextEncoder
from learners.checkpoint.export import FROZEN_SHARD, TRAINED_SHARD
from learners.learner import ContinualRecommender, LearnerConfig
from learners.records import Event, Item
from stream.config import default_model_path

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def config() -> LearnerConfig:
    # The top layer trains, so the export has a trained shard beside the frozen one.
    return LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=16, negatives=16,
                         batch_size=32, max_text_tokens=16, train_layers=1, seed=5)


@pytest.fixture(scope="module")
def encoder(config) -> TextEncoder:
    return TextEncoder(config.model_path, config.train_layers, config.max_text_tokens, torch.device("cpu"))


def film_learner(config, encoder) -> ContinualRecommender:
    """20 films and 5 users, after one experience of 64 clicks."""
    learner = ContinualRecommender(config, encoder=encoder)
    learner.add_items([Item(f"i{n}", f"film number {n}") for n in range(20)])
    click_and_learn(learner, range(64))
    return learner


def click_and_learn(learner, ks) -> None:
    for k in ks:
        learner.observe(Event(f"e{k}", f"u{k % 5}", f"i{k % 20}", "click", float(k)))
    learner.learn()


def test_later_checkpoints_link_the_frozen_shard_and_write_only_the_trained_one(tmp_path, config, encoder):
    from transformers import AutoModel

    learner = film_learner(config, encoder)
    store = CheckpointStore(tmp_path / "state", keep=1)
    first = store.save(learner, {})
    click_and_learn(learner, range(64, 128))
    second = store.save(learner, {})  # keep=1: the first checkpoint is pruned after this one commits
    assert not first.exists()
    frozen = second / "model" / FROZEN_SHARD
    assert frozen.stat().st_nlink == 1 and (second / "model" / TRAINED_SHARD).is_file()  # survived the prune
    exported = AutoModel.from_pretrained(second / "model", local_files_only=True)
    top = learner.top.layers[-1].state_dict()
    last = exported.encoder.layer[-1].state_dict()
    assert all(torch.equal(last[k], top[k].cpu()) for k in top)
    base_first = encoder.model.encoder.layer[0].state_dict()
    assert all(torch.equal(v, base_first[k].cpu()) for k, v in exported.encoder.layer[0].state_dict().items())
    inode = frozen.stat().st_ino
    third = store.save(learner, {})
    assert (third / "model" / FROZEN_SHARD).stat().st_ino == inode  # linked, not written again
    assert CheckpointStore(tmp_path / "state").load_latest(ContinualRecommender(config, encoder=encoder)) is not None


def test_a_prepared_checkpoint_holds_its_moment_while_the_learner_trains_on(tmp_path, config, encoder):
    """prepare() then write() later, as the worker does: training between them changes nothing
    of what is written, and a second checkpoint prepared before the first is written survives
    the first one's pruning and commits after it."""
    learner = film_learner(config, encoder)
    store = CheckpointStore(tmp_path / "state", keep=2)
    first = store.prepare(learner, {"n": 1})
    items_then, users_then = learner.item_vectors().copy(), learner.user_vectors([f"u{k}" for k in range(5)])
    click_and_learn(learner, range(64, 128))
    assert not np.array_equal(learner.item_vectors(), items_then)  # the model moved on
    second = store.prepare(learner, {"n": 2})
    assert second.seq > first.seq and first.tmp.is_dir()
    first_path = store.write(first)
    assert second.tmp.is_dir()  # not taken for a crashed writer's leftover by the first one's pruning
    second_path = store.write(second)
    assert store.checkpoints() == [second_path, first_path] and not list(store.state_dir.glob(".tmp-*"))
    shutil.rmtree(second_path)
    restored = ContinualRecommender(config, encoder=encoder)
    assert CheckpointStore(tmp_path / "state").load_latest(restored) == {"n": 1}
    np.testing.assert_array_equal(restored.item_vectors(), items_then)
    np.testing.assert_array_equal(restored.user_vectors([f"u{k}" for k in range(5)]), users_then)
