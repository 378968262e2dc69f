"""The model's ranking parts on their own: the causal user tower, the log-Q correction, the
popularity ladder's time scales, the full softmax. No model folder needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learners.towers.negatives import corrected_logits, log_q
from learners.statistics.popularity import PopularityLadder, parse_half_lives
from learners.towers.user_tower import AttentionTower, SumTower
from learners.state.users import UserHistories


def _tower(length: int = 6) -> AttentionTower:
    torch.manual_seed(0)
    tower = AttentionTower(dim=8, rungs=3, popularity_share=0.5, history_length=length, heads=2)
    with torch.no_grad():  # away from the initial values, so every parameter plays a part
        for param in tower.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return tower.eval()


def test_attention_is_causal_future_items_do_not_change_a_past_position():
    tower = _tower()
    ctx = torch.randn(3, 6, tower.ctx_dim)
    weights = torch.rand(3, 6) + 0.1
    weights[2, 4:] = 0.0  # a shorter history: empty places last
    before = tower.every_position(ctx, weights)
    changed = ctx.clone()
    changed[:, 0] = torch.randn(3, tower.ctx_dim)  # a different newest item (position 0)
    weights_changed = weights.clone()
    weights_changed[:, 0] *= 3.0  # and another event type for it
    after = tower.every_position(changed, weights_changed)
    torch.testing.assert_close(after[:, 1:], before[:, 1:])  # older positions: untouched
    assert not torch.allclose(after[:, 0], before[:, 0])  # the newest position did read it
    # Anything older does change a newer position.
    older = ctx.clone()
    older[:, 3] = torch.randn(3, tower.ctx_dim)
    moved = tower.every_position(older, weights)
    torch.testing.assert_close(moved[:, 4:], before[:, 4:])
    assert not torch.allclose(moved[:2, :4], before[:2, :4])


def test_fast_read_is_the_newest_position_of_the_causal_block():
    tower = _tower()
    items = torch.randn(20, tower.ctx_dim)
    rows = torch.randint(0, 20, (4, 6))
    weights = torch.rand(4, 6) + 0.1
    weights[1, 2:] = 0.0
    weights[3] = 0.0  # no history: the null slot alone
    fast = tower.read(tower.tables(items), rows, weights)
    reference = tower.every_position(items[rows], weights)[:, 0]
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(fast).all()
    # A user with no history at all reads only the null slot: the same vector for all such users.
    empty = tower.read(tower.tables(items), torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6))
    torch.testing.assert_close(empty[0], empty[1])
    torch.testing.assert_close(empty[0], fast[3])


def test_histories_come_newest_first_with_empty_places_last():
    users = UserHistories(length=4, max_users=10, recency_decay=0.5)
    for seq, row in enumerate([5, 6, 7, 8, 9]):  # ring of 4: 6..9 kept, 9 newest
        users.append("u", row, 1.0, seq)
    users.append("v", 3, 1.0, 10)
    rows, weights = users.histories_of(["u", "v"])
    assert rows[0].tolist() == [9, 8, 7, 6]
    assert np.all(np.diff(weights[0]) < 0)  # newer weigh more
    assert rows[1, 0] == 3 and weights[1, 0] == pytest.approx(1.0) and not weights[1, 1:].any()


def test_histories_match_a_sort_by_sequence_number_before_any_cut():
    """The ring walk equals sorting each user's kept events by sequence number, newest first,
    with and without ``before_seq``, after wraps, batched appends and an erasure."""
    rng = np.random.default_rng(3)
    users = UserHistories(length=5, max_users=50, recency_decay=0.8)
    log: dict[str, list[tuple[int, int, float]]] = {}  # user -> (seq, row, weight)
    seq = 0
    for _ in range(40):
        batch = [f"u{int(rng.integers(0, 6))}" for _ in range(int(rng.integers(1, 9)))]
        rows_in = [int(rng.integers(0, 30)) for _ in batch]
        weights_in = [float(rng.choice([1.0, 2.0, 3.0])) for _ in batch]
        users.append_many(batch, rows_in, weights_in, seq)
        for i, (u, r, w) in enumerate(zip(batch, rows_in, weights_in)):
            log.setdefault(u, []).append((seq + i, r, w))
        seq += len(batch)
    users.remove("u2")
    log.pop("u2", None)
    names = [f"u{i}" for i in range(7)]  # u6 never seen, u2 erased
    slots = np.array([users.slot_of(u) for u in names])
    for cut in (None, np.full(len(names), seq - 4), np.full(len(names), seq // 2)):
        rows, weights = users.histories(slots, before_seq=cut)
        for i, u in enumerate(names):
            kept = log.get(u, [])[-5:]  # what the ring still holds
            if cut is not None:
                kept = [e for e in kept if e[0] < cut[i]]
            kept = kept[::-1]
            expected_rows = [r for _, r, _ in kept] + [0] * (5 - len(kept))
            raw = np.array([w * 0.8 ** k for k, (_, _, w) in enumerate(kept)] + [0.0] * (5 - len(kept)))
            expected = raw / raw.sum() if raw.sum() else raw
            assert rows[i].tolist() == expected_rows, (u, cut)
            np.testing.assert_allclose(weights[i], expected, rtol=1e-5, atol=1e-7)


def test_log_q_term_is_the_expected_count_among_the_negatives():
    freq = torch.tensor([0.0, 0.1, 0.5])
    # 4 uniform negatives over 8 items, 16 in-batch ones drawn by frequency.
    expected = torch.log(4 / 8 + 16 * freq)
    torch.testing.assert_close(log_q(freq, 4, 16, 8), expected)
    # Logits: dot / temperature minus that term, the row's own item masked among the candidates.
    users = torch.eye(3)
    items = torch.eye(3)
    pos = torch.tensor([0, 1, 2])
    neg = torch.tensor([1, 2])
    logits = corrected_logits(users, pos, items[pos], neg, items[neg], freq[pos], freq[neg], n_items=8,
                              in_batch=True, temperature=0.5)
    assert logits.shape == (3, 1 + 2 + 3)
    q = log_q(freq, 2, 3, 8)
    torch.testing.assert_close(logits[:, 0], 2.0 - q[pos])  # dot 1 / 0.5
    assert math.isinf(logits[1, 1]) and math.isinf(logits[2, 2])  # uniform negative = own item
    assert all(math.isinf(logits[r, 3 + r]) for r in range(3))  # in-batch: the row's own event
    assert logits[0, 4] == pytest.approx(0.0 - float(q[1]))  # user 0 vs item 1: dot 0
    # Uniform negatives only: the term is the same for every column, so no ranking changes.
    plain = corrected_logits(users, pos, items[pos], neg, items[neg], freq[pos], freq[neg], n_items=8,
                             in_batch=False, temperature=0.5)
    raw = torch.cat([2.0 * torch.ones(3, 1), 2.0 * users @ items[neg].T], dim=1)
    finite = torch.isfinite(plain)
    torch.testing.assert_close(plain[finite], raw[finite] - math.log(2 / 8))


def test_popularity_half_lives_scale_with_the_catalogue():
    ladder = PopularityLadder(parse_half_lives("0.5,2"))
    assert ladder.rungs == 3
    for catalogue in (100, 10_000):
        counts = torch.zeros(catalogue, ladder.rungs)
        ladder.observe(counts, torch.tensor([0]), catalogue)  # one event of row 0 ...
        half = int(0.5 * catalogue)
        ladder.observe(counts, torch.ones(half, dtype=torch.long), catalogue)  # ... then half a catalogue more
        # The first rung halves after 0.5 catalogue sizes of events, whatever the size; the
        # all-time rung never decays.
        assert float(counts[0, 0]) == pytest.approx(0.5, rel=1e-4)
        assert float(counts[0, 1]) == pytest.approx(0.5 ** 0.25, rel=1e-4)
        assert float(counts[0, 2]) == 1.0
    feats = ladder.features(counts, torch.tensor([0, 1, 2]), catalogue)
    assert float(feats.max()) == pytest.approx(1.0) and float(feats[2].sum()) == 0.0
    freq = ladder.frequency(counts, torch.tensor([0, 1]))
    assert float(freq.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        parse_half_lives("1,0")


def test_sum_tower_is_the_weighted_sum():
    tower = SumTower(dim=4, rungs=2, popularity_share=0.5)
    ctx = torch.randn(5, 4)
    rows = torch.tensor([[1, 2, 0]])
    weights = torch.tensor([[0.7, 0.3, 0.0]])
    out = tower.read(tower.tables(ctx), rows, weights)
    torch.testing.assert_close(out[0, :4], tower.global_ctx + 0.7 * ctx[1] + 0.3 * ctx[2])
    assert out.shape == (1, 4 + 3)


def _two_tower(n_items: int, **kwargs):
    from learners.encoder.top_layers import TopLayers
    from learners.state.features import ItemFeatures
    from learners.towers.model import TwoTower

    torch.manual_seed(0)
    features = ItemFeatures(6)
    features.ensure_rows(n_items)
    for row in range(n_items - 1):  # the last row has no text: id part only
        features.set_frozen(row, torch.randn(6))
        features.pooled[row] = features.frozen[row]
    model = TwoTower(TopLayers(), features, hidden_size=6, dim=12, negatives=4, temperature=0.1,
                     device=torch.device("cpu"), user_tower="sum", **kwargs)
    model.grow(n_items)
    model.observe_popularity(torch.tensor([0, 0, 1, 2]))
    return model


def test_full_softmax_scores_every_item_and_trains_every_id_row():
    model = _two_tower(9, full_softmax=True)
    hist = torch.tensor([[1, 2], [3, 0]])
    weights = torch.tensor([[0.6, 0.4], [1.0, 0.0]])
    pos = torch.tensor([4, 4])
    logits, target = model((hist, weights, pos))
    assert logits.shape == (2, 9) and target.tolist() == [4, 4]
    # The softmax is over the published space itself: user . item / temperature, every item.
    expected = model.user_vectors(hist, weights) @ model.item_table().T / model.temperature
    torch.testing.assert_close(logits, expected)
    model.loss((logits, target)).backward()
    touched = model.item_emb.grad.coalesce().indices()[0].unique()
    assert set(range(9)) <= set(touched.tolist())  # negatives too, not only the positives


def test_sampled_softmax_targets_column_zero():
    model = _two_tower(9, full_softmax=False, in_batch_negatives=False)
    hist = torch.tensor([[1, 2]])
    logits, target = model((hist, torch.tensor([[0.5, 0.5]]), torch.tensor([4])))
    assert logits.shape == (1, 1 + 4) and target.tolist() == [0]
