"""User histories, the catalogue and the de-duplication ledger (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from learners.state.catalogue import Catalogue
from learners.state.users import UserHistories
from stream.worker.dedup import EventLedger


def test_histories_weight_newer_events_more_and_sum_to_one():
    users = UserHistories(length=4, max_users=10, recency_decay=0.5)
    users.append("u", item_row=7, weight=1.0, seq=0)
    users.append("u", item_row=8, weight=1.0, seq=1)
    rows, weights = users.histories_of(["u"])
    assert sorted(rows[0][weights[0] > 0].tolist()) == [7, 8]
    w = dict(zip(rows[0].tolist(), weights[0].tolist()))
    assert abs(sum(weights[0]) - 1.0) < 1e-6
    assert abs(w[8] / w[7] - 2.0) < 1e-5  # newest counts 1, one step older 0.5


def test_history_before_seq_only_sees_older_events_and_ring_keeps_last():
    users = UserHistories(length=3, max_users=10, recency_decay=1.0)
    for seq, row in enumerate([1, 2, 3, 4]):
        users.append("u", row, 1.0, seq)
    rows, weights = users.histories_of(["u"])
    assert sorted(rows[0][weights[0] > 0].tolist()) == [2, 3, 4]  # ring of 3
    slot = users.slot_of("u")
    rows, weights = users.histories(np.array([slot]), before_seq=np.array([3]))
    assert sorted(rows[0][weights[0] > 0].tolist()) == [2, 3]


def test_unknown_user_has_empty_history_and_lru_eviction_bounds_users():
    users = UserHistories(length=2, max_users=2)
    rows, weights = users.histories_of(["nobody"])
    assert weights.sum() == 0
    users.append("a", 1, 1.0, 0)
    users.append("b", 2, 1.0, 1)
    users.append("a", 3, 1.0, 2)  # a is now the most recent
    users.append("c", 4, 1.0, 3)  # evicts b
    assert "b" not in users and "a" in users and "c" in users
    assert len(users) == 2 and users.evictions == 1
    assert users.item_rows_of("c").tolist() == [4]


def test_user_state_round_trip():
    users = UserHistories(length=3, max_users=5)
    for i in range(7):
        users.append(f"u{i % 3}", i, 2.0, i)
    copy = UserHistories(length=3, max_users=5)
    copy.load_state(users.state())
    for u in ("u0", "u1", "u2"):
        np.testing.assert_array_equal(copy.histories_of([u])[0], users.histories_of([u])[0])
    copy.append("new", 9, 1.0, 99)
    assert copy.item_rows_of("new").tolist() == [9]
    assert users.item_rows_of("u0").tolist() == copy.item_rows_of("u0").tolist()


def test_user_state_holds_only_used_slots_and_an_empty_one_restores():
    users = UserHistories(length=4, max_users=5000)
    for i in range(1500):  # capacity doubles past 1024: 476 slots nobody holds
        users.append(f"u{i}", i, 1.0, i)
    state = users.state()
    assert state["rows"].shape == (1500, 4) and state["rows"].dtype == np.int32
    copy = UserHistories(length=4, max_users=5000)
    copy.load_state(state)
    copy.append("late", 7, 1.0, 10_000)  # grows past the saved rows
    assert copy.item_rows_of("late").tolist() == [7] and copy.item_rows_of("u1499").tolist() == [1499]
    empty = UserHistories(length=4, max_users=5000)
    empty.load_state(UserHistories(length=4, max_users=5000).state())
    empty.append("first", 3, 1.0, 0)
    assert empty.item_rows_of("first").tolist() == [3]


def test_catalogue_rows_are_stable_and_text_changes_are_reported():
    cat = Catalogue()
    assert cat.row("a") == 0 and cat.row("b") == 1 and cat.row("a") == 0
    assert cat.set_text("b", "x") == (1, True)
    assert cat.set_text("b", "x") == (1, False)
    assert cat.set_text("c", "y") == (2, True)
    again = Catalogue.from_state(cat.state())
    assert again.ids == ["a", "b", "c"] and again.texts == [None, "x", "y"]


def test_ledger_recognises_duplicates_within_its_window():
    ledger = EventLedger(capacity=3)
    assert ledger.add("a") and ledger.add("b") and not ledger.add("a")
    ledger.add("c")
    ledger.add("d")  # window is b, c, d: a forgotten
    assert ledger.add("a")
    restored = EventLedger.from_state(3, ledger.state())
    assert not restored.add("a") and len(restored) == 3


def test_profile_is_a_uniform_sample_of_the_whole_history():
    users = UserHistories(length=8, max_users=10, profile_length=100)
    for seq in range(1000):  # items 0..999 in order: the ring keeps only the last 8
        users.append("u", seq, 1.0 + seq % 3, seq)
    rows, weights = users.histories_of(["u", "nobody"])
    sample = rows[0][weights[0] > 0]
    assert len(set(sample.tolist())) == 100
    assert weights[0].sum() == pytest.approx(1.0) and weights[1].sum() == 0.0
    # Uniform over the whole stream, not the recent end: each quarter holds about a quarter.
    quarters = np.bincount(sample // 250, minlength=4)
    assert quarters.min() >= 12, quarters
    # The sample's weights are the events' own weights, normalised.
    raw = 1.0 + sample % 3
    assert np.allclose(weights[0][weights[0] > 0], raw / raw.sum())


def test_profile_survives_a_state_round_trip_and_is_rebuilt_from_rings_when_missing():
    users = UserHistories(length=4, max_users=10, profile_length=16)
    for seq in range(40):
        users.append(f"u{seq % 2}", seq, 1.0, seq)
    state = users.state()
    restored = UserHistories(length=4, max_users=10, profile_length=16)
    restored.load_state(state)
    for a, b in zip(users.histories_of(["u0", "u1"]), restored.histories_of(["u0", "u1"])):
        assert np.array_equal(a, b)
    old = {k: v for k, v in state.items() if not k.startswith("profile_")}  # an older checkpoint
    rebuilt = UserHistories(length=4, max_users=10, profile_length=16)
    rebuilt.load_state(old)
    rows, weights = rebuilt.histories_of(["u0"])
    assert sorted(rows[0][weights[0] > 0].tolist()) == [32, 34, 36, 38]  # u0's ring


@pytest.mark.parametrize("max_users, profile_length", [(1000, 0), (6, 0), (1000, 4)])
def test_append_many_leaves_the_same_state_as_appending_one_by_one(max_users, profile_length):
    """Batches of every shape -- users with more events than the ring in one batch, new users
    that grow the arrays, evictions, the profile reservoir -- against the one-by-one path."""
    rng = np.random.default_rng(5)
    batched = UserHistories(length=4, max_users=max_users, profile_length=profile_length)
    single = UserHistories(length=4, max_users=max_users, profile_length=profile_length)
    seq = 0
    for size in (1, 3, 9, 40, 200, 2000, 7):
        users = [f"u{int(u)}" for u in rng.integers(0, 1500 if size == 2000 else 12, size)]
        rows = rng.integers(0, 50, size).tolist()
        weights = rng.choice([1.0, 2.0, 3.0], size).tolist()
        slots = batched.append_many(users, rows, weights, seq)
        assert slots == [single.append(u, r, w, seq + i) for i, (u, r, w) in enumerate(zip(users, rows, weights))]
        seq += size
    assert batched.user_ids() == single.user_ids() and batched.evictions == single.evictions
    for key, value in single.state().items():
        np.testing.assert_array_equal(batched.state()[key], value, err_msg=key)
