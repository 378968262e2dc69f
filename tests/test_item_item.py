"""The item-item head: the fit finds co-occurrence, the folded vectors score exactly as documented."""

import numpy as np
import pytest

from learners.statistics.item_item import WEIGHT_GRID, ItemItemHead, SharedFits, head_dims


def _histories(pairs: int, users: int, length: int = 4, seed: int = 0):
    """Users who each saw one pair (2k, 2k+1) plus noise: the pair's items predict each other."""
    rng = np.random.default_rng(seed)
    n_items = 2 * pairs + 10
    rows = np.zeros((users, length), np.int64)
    weights = np.zeros((users, length), np.float32)
    for u in range(users):
        k = u % pairs
        rows[u, :3] = [2 * k, 2 * k + 1, 2 * pairs + rng.integers(10)]
        weights[u, :3] = [0.5, 0.3, 0.2]
    return rows, weights, n_items


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_fit_finds_the_items_that_occur_together():
    rows, weights, n_items = _histories(pairs=6, users=120)
    head = ItemItemHead(dims=2 * 6 + 10 + 1, weight=1.0, l2=1.0)  # full rank: exactly EASE
    head.install(head.fit(rows, weights, n_items, events_seen=360), 360)
    f = head.factors
    scores = f.user[4] @ f.item.T  # a user who saw item 4 alone: its partner 5 comes first
    scores[4] = -np.inf
    assert int(np.argmax(scores)) == 5


def test_folded_vectors_are_unit_and_score_the_cosine_plus_the_weighted_item_item_score():
    rows, weights, n_items = _histories(pairs=6, users=120)
    head = ItemItemHead(dims=8, weight=0.3, l2=1.0)
    head.install(head.fit(rows, weights, n_items, events_seen=360), 360)
    model_items, model_users = _unit(n_items, 12, 1), _unit(3, 12, 2)
    items = head.items(model_items, np.arange(n_items))
    hist_rows, hist_weights = rows[:3], weights[:3]
    users = head.users(model_users, hist_rows, hist_weights)
    assert items.shape == (n_items, 20) and users.shape == (3, 20)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, atol=1e-5)
    f = head.factors
    p = np.einsum("nl,nlr->nr", hist_weights, f.user[hist_rows])
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    wanted = model_users @ model_items.T + 0.3 * (p @ f.item.T) / f.rms
    got = users @ items.T
    scale = got[0, 0] / wanted[0, 0]  # one positive constant for every pair
    assert scale > 0
    np.testing.assert_allclose(got, wanted * scale, atol=1e-5)


def test_users_without_history_in_the_head_keep_their_model_vector():
    rows, weights, n_items = _histories(pairs=3, users=30)
    head = ItemItemHead(dims=4, weight=0.3, l2=1.0)
    model_users = _unit(2, 6, 3)
    before_fit = head.users(model_users, rows[:2], weights[:2])
    np.testing.assert_allclose(before_fit[:, :6], model_users)
    assert not before_fit[:, 6:].any()
    head.install(head.fit(rows, weights, n_items, events_seen=90), 90)
    empty = head.users(model_users, np.zeros((2, 4), np.int64), np.zeros((2, 4), np.float32))
    np.testing.assert_allclose(empty[:, :6], model_users)
    unknown = head.items(_unit(2, 6, 4), np.array([n_items + 5, n_items + 6]))  # first seen after the fit
    np.testing.assert_allclose(np.linalg.norm(unknown, axis=1), 1.0, atol=1e-6)


def test_state_round_trip_gives_the_same_vectors():
    rows, weights, n_items = _histories(pairs=4, users=40)
    head = ItemItemHead(dims=6, weight=0.3, l2=1.0)
    head.install(head.fit(rows, weights, n_items, events_seen=120), 120)
    again = ItemItemHead(dims=6, weight=0.3, l2=1.0)
    again.load_state(head.state())
    model_items = _unit(n_items, 5, 5)
    np.testing.assert_array_equal(head.items(model_items, np.arange(n_items)),
                                  again.items(model_items, np.arange(n_items)))
    assert again.events_at_fit == 120 and not again.due(120 + n_items - 1, n_items)


def test_the_fit_is_deterministic_and_keeps_to_the_most_active_items():
    rows, weights, n_items = _histories(pairs=6, users=120)
    one = ItemItemHead(dims=8, weight=0.3, l2=1.0, max_items=4).fit(rows, weights, n_items, 360)
    two = ItemItemHead(dims=8, weight=0.3, l2=1.0, max_items=4).fit(rows, weights, n_items, 360)
    np.testing.assert_array_equal(one.item, two.item)
    assert int((np.abs(one.item).sum(1) > 0).sum()) <= 4


@pytest.mark.parametrize("vector_dim,wanted,dims", [(192, 64, 64), (16, 64, 8), (64, 0, 0)])
def test_the_head_takes_at_most_half_of_a_vector(vector_dim, wanted, dims):
    assert head_dims(vector_dim, wanted) == dims


def test_a_refit_is_due_by_events_and_within_its_share_of_wall_time(monkeypatch):
    import learners.statistics.item_item as module

    rows, weights, n_items = _histories(pairs=4, users=40)
    head = ItemItemHead(dims=6, weight=0.3, l2=1.0, refit=1.0, time_share=0.5)
    assert not head.due(100, n_items) and head.due(300, n_items)  # the first fit once 256 events are in
    factors = head.fit(rows, weights, n_items, 300)
    factors.seconds = 10.0
    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    head.install(factors, 300)
    assert not head.due(300 + 255, n_items)  # too few new events
    assert not head.due(300 + 256, n_items)  # enough events, but a 10 s fit may take only half the time
    clock[0] += 10.0
    assert head.due(300 + 256, n_items)
    head.time_share = 0.0  # no time budget: events alone
    clock[0] -= 10.0
    assert head.due(300 + 256, n_items)


def test_the_weight_follows_what_ranks_the_newest_events_best():
    rows, weights, n_items = _histories(pairs=6, users=120)
    head = ItemItemHead(dims=2 * 6 + 10 + 1, weight=0.2, l2=1.0)
    head.install(head.fit(rows, weights, n_items, 360), 360)
    # Users who saw 2k go to 2k+1 next; the model's vectors know nothing (random).
    hist = np.zeros((60, 4), np.int64)
    hist_w = np.zeros((60, 4), np.float32)
    hist[:, 0] = 2 * (np.arange(60) % 6)
    hist_w[:, 0] = 1.0
    targets = hist[:, 0] + 1
    head.weigh(_unit(60, 8, 6), _unit(n_items, 8, 7), hist, hist_w, targets)
    assert head.weight == max(WEIGHT_GRID)
    # Now the model knows exactly where each user goes and the head points elsewhere: it is turned down.
    model_items = _unit(n_items, 8, 8)
    wrong = (hist[:, 0] + 2) % n_items
    for _ in range(5):
        head.weigh(model_items[wrong], model_items, hist, hist_w, wrong)
    assert head.weight < max(WEIGHT_GRID) and head.evidence[0] > head.evidence[-1]


def test_the_fit_weighs_older_events_by_its_own_recency():
    # Histories as the user store gives them: event type times 0.9 per newer event, normalised.
    types = np.array([[2.0, 1.0, 1.0, 2.0], [1.0, 1.0, 0.0, 0.0]], np.float32)
    filled = types > 0
    weights = types * 0.9 ** np.arange(4, dtype=np.float32)
    weights /= weights.sum(1, keepdims=True)
    flat = ItemItemHead(dims=4, weight=0.2, recency=1.0, history_recency=0.9)
    np.testing.assert_allclose(flat._entries(weights), types / types.max(1, keepdims=True), rtol=1e-5)
    slow = ItemItemHead(dims=4, weight=0.2, recency=0.5, history_recency=0.9)
    expected = types * 0.5 ** np.arange(4)
    np.testing.assert_allclose(slow._entries(weights), expected / expected.max(1, keepdims=True), rtol=1e-5)
    same = ItemItemHead(dims=4, weight=0.2, recency=0.9, history_recency=0.9)
    np.testing.assert_allclose(same._entries(weights), weights / weights.max(1, keepdims=True), rtol=1e-6)
    assert (flat._entries(weights)[~filled] == 0).all()  # empty places stay empty
    # A steep user-tower decay over a long ring: old weights underflow, nothing overflows.
    steep = 0.05 ** np.arange(64, dtype=np.float64)
    steep = (steep / steep.sum()).astype(np.float32)[None, :]
    entries = ItemItemHead(dims=4, weight=0.2, recency=0.995, history_recency=0.05)._entries(steep)
    assert np.isfinite(entries).all() and entries.max() == 1.0 and entries[0, 1] == pytest.approx(0.995)


def test_shared_fits_give_what_a_fit_of_ones_own_gives_and_fit_each_input_once(monkeypatch):
    rows, weights, n_items = _histories(pairs=6, users=120)
    head = ItemItemHead(dims=8, weight=1.0, l2=1.0)
    alone = head.fit(rows, weights, n_items, events_seen=360)
    shared = SharedFits()
    made = []
    fit = ItemItemHead.fit
    monkeypatch.setattr(ItemItemHead, "fit", lambda self, *args: made.append(args) or fit(self, *args))
    for _ in range(3):  # three strategies reading the same stream
        got = shared.fit(ItemItemHead(dims=8, weight=0.3, l2=1.0), rows, weights, n_items, 360)
        np.testing.assert_array_equal(got.user, alone.user)
        np.testing.assert_array_equal(got.item, alone.item)
        assert (got.max_norm, got.rms) == (alone.max_norm, alone.rms)
    assert len(made) == 1 and shared.hits == 2
    later = weights.copy()
    later[0, 0] = 1.0  # one more event: another input, another fit
    shared.fit(head, rows, later, n_items, 361)
    shared.fit(ItemItemHead(dims=8, weight=1.0, l2=2.0), rows, weights, n_items, 360)  # another setting
    assert len(made) == 3
