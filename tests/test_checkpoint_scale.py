"""A checkpoint at realistic scale: 10k items, 1k users, a full replay reservoir, in seconds.

Uses the real default model (all-MiniLM-L6-v2); frozen features are synthesised.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from learners.checkpoint import CheckpointStore
from learners.encoder import TextEncoder
from learners.continual.experience import make_experience
from learners.learner import ContinualRecommender, LearnerConfig
from learners.records import Event
from stream.config import default_model_path

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(default_model_path(), 1, 24, torch.device("cpu"))


def test_checkpoint_of_10k_items_and_1k_users_takes_seconds(tmp_path, encoder):
    """Frozen features are synthesised (encoding 10k texts is not what is measured)."""
    config = LearnerConfig(model_path=default_model_path(), device="cpu", train_layers=1, max_text_tokens=32,
                           batch_size=128, negatives=256, replay_size=20_000, refresh_per_update=256)
    learner = ContinualRecommender(config, encoder=encoder)
    n_items, n_users, hidden = 10_000, 1_000, encoder.hidden_size
    gen = torch.Generator().manual_seed(0)
    for i in range(n_items):
        learner.catalogue.set_text(f"item-{i}", f"text of item {i}")
    learner.features.ensure_rows(n_items)
    lengths = torch.randint(8, 33, (n_items,), generator=gen)
    for i in range(n_items):
        learner.features.set_frozen(i, torch.randn(int(lengths[i]), hidden, generator=gen).to(torch.float16))
    learner.features.pooled[:n_items] = torch.randn(n_items, hidden, generator=gen)
    rng = np.random.default_rng(0)
    for k in range(600):
        learner.observe(Event(f"e{k}", f"user-{rng.integers(n_users)}", f"item-{rng.integers(n_items)}",
                              "click", float(k)))
    learner.learn()  # optimizer, EWC and replay state (training itself is not what is measured)
    policy = learner.parts.replay.storage_policy
    width = learner.config.history_length
    policy.update_from_dataset(make_experience(rng.integers(0, n_items, (20_000, width)), rng.random((20_000, width)),
                                               rng.integers(0, n_items, 20_000), 1).dataset)  # a full buffer
    for k in range(600, 6_000):
        learner.observe(Event(f"e{k}", f"user-{k % n_users}", f"item-{rng.integers(n_items)}", "click", float(k)))

    store = CheckpointStore(tmp_path / "state")
    started = time.perf_counter()
    path = store.save(learner, {"ledger": [f"e{k}" for k in range(6_000)]})
    save_s = time.perf_counter() - started
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    restored = ContinualRecommender(config, encoder=encoder)
    started = time.perf_counter()
    CheckpointStore(tmp_path / "state").load_latest(restored)
    load_s = time.perf_counter() - started
    assert len(policy.buffer) == 20_000 and len(learner.users) == n_users
    sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    print("\n" + ", ".join(f"{name} {n / 1e6:.1f} MB" for name, n in sorted(sizes.items(), key=lambda kv: -kv[1])))
    print(f"checkpoint of {n_items} items / {len(learner.users)} users: {size / 1e6:.1f} MB "
          f"(model/ {sum(p.stat().st_size for p in (path / 'model').rglob('*') if p.is_file()) / 1e6:.1f} MB), "
          f"save {save_s:.2f} s, load {load_s:.2f} s")
    users = [f"user-{u}" for u in range(0, n_users, 7)]
    np.testing.assert_array_equal(restored.user_vectors(users), learner.user_vectors(users))
    np.testing.assert_array_equal(restored.item_vectors(), learner.item_vectors())
    assert save_s < 20 and load_s < 20  # a few seconds on an idle machine; generous for a shared one
