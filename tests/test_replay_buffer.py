"""The tensor reservoir: bounded in-place storage, uniform reservoir sampling, exact continuation after a restore."""

from __future__ import annotations

import numpy as np
import torch
from avalanche.training.storage_policy import ExemplarsBuffer

from learners.continual.experience import make_experience
from learners.continual.replay_buffer import TensorReservoir
from learners.continual.strategy import ReservoirReplay

LENGTH = 4
SIZES = [1, 7, 128, 3, 256, 45, 200, 60, 300]  # 1000 samples in experiences of varied sizes


def _samples(start: int, n: int):
    """Samples numbered start..start+n-1: the number is the item row and is encoded in rows and weights."""
    items = torch.arange(start, start + n)
    rows = items.unsqueeze(1) * LENGTH + torch.arange(LENGTH)
    weights = (items.unsqueeze(1).float() / 1000).expand(n, LENGTH).contiguous()
    return rows, weights, items


def _feed(policy: TensorReservoir, sizes, start: int = 0) -> int:
    for size in sizes:
        policy.add(*_samples(start, size))
        start += size
    return start


def _check_whole_samples(policy: TensorReservoir) -> None:
    """Every slot holds rows, weights and item of one and the same sample."""
    rows, weights, items = policy.tensors()
    assert torch.equal(rows, items.unsqueeze(1) * LENGTH + torch.arange(LENGTH))
    assert torch.equal(weights, (items.unsqueeze(1).float() / 1000).expand(-1, LENGTH))


def test_keeps_exactly_capacity_in_the_same_memory():
    policy = TensorReservoir(max_size=100)
    assert isinstance(policy, ExemplarsBuffer) and len(policy.buffer) == 0
    policy.add(*_samples(0, 30))
    assert policy.filled == 30 and torch.equal(policy.tensors()[2], torch.arange(30))  # filling: in order
    pointers = [t.data_ptr() for t in policy._store]
    seen = _feed(policy, [128, 512, 7, 256] * 10, start=30)
    assert policy.filled == 100 and policy.seen_samples == seen
    rows, weights, items = policy.tensors()
    assert rows.shape == (100, LENGTH) and weights.shape == (100, LENGTH) and items.shape == (100,)
    assert len(set(items.tolist())) == 100  # no sample kept twice
    assert [t.data_ptr() for t in policy._store] == pointers  # updated in place, never reallocated
    assert rows.data_ptr() == pointers[0]  # tensors() are views, not copies
    _check_whole_samples(policy)


def test_every_sample_is_kept_with_probability_capacity_over_seen():
    """Over 300 seeds, each of 1000 samples is kept ~ 300 * 10/1000 = 3 times.

    "Keep the first 10", "keep the last 10" or a lean towards either end fails:
    each end of the stream is checked on its own, and no sample may be kept often.
    """
    cap, n, runs = 10, sum(SIZES), 300
    counts = torch.zeros(n)
    for seed in range(runs):
        policy = TensorReservoir(max_size=cap, seed=seed)
        k = seed % len(SIZES)
        _feed(policy, SIZES[k:] + SIZES[:k])
        _check_whole_samples(policy)
        counts[policy.tensors()[2]] += 1
    expected = runs * cap / n
    assert counts.sum() == runs * cap
    assert counts.max() <= 15  # Binomial(300, 0.01): sd 1.7; 15 is 7 sd above the mean
    for part in (counts[:100], counts[100:500], counts[500:900], counts[900:]):
        assert abs(part.mean().item() - expected) < 0.25 * expected, (part.mean(), expected)


def test_same_as_sequential_algorithm_r_with_the_same_draws():
    """Vectorised update == one sample at a time, where a later sample drawing the same slot wins."""
    cap, seed = 50, 11
    policy = TensorReservoir(max_size=cap, seed=seed)
    kept, seen = [None] * cap, 0
    for size in [30, 40, 256, 512, 5, 300]:
        policy.add(*_samples(seen, size))
        gen = torch.Generator().manual_seed(seed + seen)
        uniform = torch.rand(size, generator=gen, dtype=torch.float64)
        for i in range(size):
            number = seen + i
            slot = number if number < cap else min(int(uniform[i] * (number + 1)), number)
            if slot < cap:
                kept[slot] = number
        seen += size
    assert policy.tensors()[2].tolist() == kept


def test_restored_reservoir_continues_exactly_like_the_uninterrupted_one():
    first, rest = [100, 300, 7], [250, 128, 400]
    uninterrupted = TensorReservoir(max_size=200)
    start = _feed(uninterrupted, first)
    saved = [t.clone() for t in uninterrupted.tensors()], uninterrupted.seen_samples
    _feed(uninterrupted, rest, start)

    restored = TensorReservoir(max_size=200)
    restored.load(*saved[0], seen=saved[1])
    _feed(restored, rest, start)
    assert restored.seen_samples == uninterrupted.seen_samples
    assert all(torch.equal(a, b) for a, b in zip(restored.tensors(), uninterrupted.tensors()))


def test_load_keeps_the_first_max_size_and_survives_an_unknown_seen_count():
    rows, weights, items = _samples(0, 300)
    small = TensorReservoir(max_size=120)
    small.load(rows, weights, items, seen=5000)
    assert small.filled == 120 and small.seen_samples == 5000
    assert torch.equal(small.tensors()[2], torch.arange(120))
    # An older checkpoint has no count: its samples count as all there was.
    old = TensorReservoir(max_size=500)
    old.load(rows, weights, items, seen=None)
    assert old.filled == 300 and old.seen_samples == 300
    _feed(old, [150], start=300)  # free slots fill first, then reservoir sampling
    assert old.filled == 450 and torch.equal(old.tensors()[2], torch.arange(450))
    _feed(old, [400], start=450)
    assert old.filled == 500 and old.seen_samples == 850
    _check_whole_samples(old)


def test_buffer_is_an_avalanche_dataset_of_the_kept_samples():
    policy = TensorReservoir(max_size=64)
    _feed(policy, [40, 40])
    dataset = policy.buffer
    assert policy.buffer is dataset  # cached until the next update
    rows, weights, items = policy.tensors()
    assert len(dataset) == 64
    for i in (0, 37, 63):
        r, w, item, _task = dataset[i]
        assert torch.equal(r, rows[i]) and torch.equal(w, weights[i]) and int(item) == int(items[i])
    before = items.tolist()
    _feed(policy, [200], start=80)
    assert policy.buffer is not dataset and policy.tensors()[2].tolist() != before
    assert [int(dataset[i][2]) for i in range(64)] == before  # the old one was a copy, not a view


def test_plugin_updates_from_the_experience_and_mixes_replayed_samples():
    plugin = ReservoirReplay(mem_size=32, batch_size_mem=8)
    policy = plugin.storage_policy
    assert isinstance(policy, TensorReservoir) and policy.max_size == 32

    class Strategy:
        mbatch = None

    rows, weights, items = _samples(0, 20)
    strategy = Strategy()
    strategy.experience = make_experience(rows.numpy(), weights.numpy(), items.numpy(), 0)
    strategy.mbatch = [rows[:4], weights[:4], items[:4], torch.zeros(4, dtype=torch.long)]
    plugin.before_training_iteration(strategy)
    assert len(strategy.mbatch[0]) == 4  # nothing to replay yet
    plugin.after_training_exp(strategy)  # Avalanche's hook: storage_policy.update(strategy)
    assert policy.filled == 20 and policy.seen_samples == 20
    plugin.before_training_iteration(strategy)
    mixed = strategy.mbatch
    assert [len(t) for t in mixed] == [12] * 4 and mixed[0].dtype == torch.int64
    replayed = mixed[2][4:]
    assert torch.equal(mixed[0][4:], replayed.unsqueeze(1) * LENGTH + torch.arange(LENGTH))


def test_remove_owner_takes_out_exactly_that_owners_samples_and_sampling_goes_on():
    policy = TensorReservoir(max_size=50)
    start = 0
    for size in (30, 40, 25):
        rows, weights, items = _samples(start, size)
        policy.add(rows, weights, items, owners=items % 3 + 1)  # owner 1, 2 or 3 by sample number
        start += size
    before = {int(i): int(o) for i, o in zip(policy.tensors()[2], policy.owners())}
    assert set(before.values()) == {1, 2, 3}
    removed = policy.remove_owner(2)
    assert removed == sum(1 for o in before.values() if o == 2)
    assert policy.filled == 50 - removed
    assert 2 not in policy.owners().tolist()
    assert {int(i): int(o) for i, o in zip(policy.tensors()[2], policy.owners())} == \
        {i: o for i, o in before.items() if o != 2}
    _check_whole_samples(policy)
    assert policy.remove_owner(2) == 0  # erasing again changes nothing
    rows, weights, items = _samples(start, 10)
    policy.add(rows, weights, items, owners=torch.full((10,), 4))
    assert policy.filled == min(50, 50 - removed + 10)
    _check_whole_samples(policy)


def test_owner_tags_come_from_the_experience_and_survive_load():
    rows, weights, items = _samples(0, 20)
    experience = make_experience(rows.numpy(), weights.numpy(), items.numpy(), 0, owners=(items % 2 + 7).numpy())
    policy = TensorReservoir(max_size=30)
    policy.update_from_dataset(experience.dataset)
    assert policy.owners().tolist() == (items % 2 + 7).tolist()
    copy = TensorReservoir(max_size=30)
    copy.load(*policy.tensors(), policy.seen_samples, owners=policy.owners())
    assert copy.remove_owner(7) == 10 and set(copy.owners().tolist()) == {8}


def test_replay_leaves_out_the_users_who_are_in_the_experience():
    plugin = ReservoirReplay(mem_size=64, batch_size_mem=256)

    class Strategy:
        mbatch = None

    rows, weights, items = _samples(0, 40)
    owners = np.arange(40) % 4 + 1  # four users, ten samples each
    strategy = Strategy()
    strategy.experience = make_experience(rows.numpy(), weights.numpy(), items.numpy(), 0, owners)
    plugin.after_training_exp(strategy)
    fresh_rows, fresh_weights, fresh_items = _samples(100, 4)
    strategy.experience = make_experience(fresh_rows.numpy(), fresh_weights.numpy(), fresh_items.numpy(), 1,
                                          np.array([1, 2, 1, 2]))
    plugin.before_training_exp(strategy)
    strategy.mbatch = [fresh_rows, fresh_weights, fresh_items, torch.zeros(4, dtype=torch.long)]
    plugin.before_training_iteration(strategy)
    replayed = strategy.mbatch[2][4:]
    assert len(replayed) == 256
    assert set((replayed.numpy() % 4 + 1).tolist()) == {3, 4}  # users 1 and 2 are here: not replayed


def test_replay_strength_scales_how_many_samples_join_a_minibatch():
    plugin = ReservoirReplay(mem_size=32, batch_size_mem=8)

    class Strategy:
        mbatch = None

    rows, weights, items = _samples(0, 20)
    strategy = Strategy()
    strategy.experience = make_experience(rows.numpy(), weights.numpy(), items.numpy(), 0)
    plugin.after_training_exp(strategy)
    for strength, replayed in ((0.5, 4), (0.0, 0)):
        plugin.strength = strength
        strategy.mbatch = [rows[:4], weights[:4], items[:4], torch.zeros(4, dtype=torch.long)]
        plugin.before_training_iteration(strategy)
        assert len(strategy.mbatch[0]) == 4 + replayed
