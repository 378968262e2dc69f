"""What fake accounts can move of the statistics every user shares (learners.credibility)."""

from __future__ import annotations

import numpy as np
import torch

from learners import credibility, item_evidence
from learners.popularity import PopularityLadder


def _histories(*rows_per_user: list[int], length: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rows = np.zeros((len(rows_per_user), length), np.int64)
    weights = np.zeros((len(rows_per_user), length), np.float32)
    for i, held in enumerate(rows_per_user):
        rows[i, :len(held)] = held
        weights[i, :len(held)] = 1.0 / max(len(held), 1)
    return rows, weights


def test_a_user_counts_by_distinct_items_held_and_once_per_item():
    rows, weights = _histories([], [1, 1, 1], [1, 2, 3, 4], [5, 6, 7, 8, 9, 0], [2, 3])
    items = np.array([7, 4, 9, 4, 2])
    got = credibility.event_credibility(rows, weights, items, established_items=4)
    # new user; 1 distinct item; 4 distinct; 6 distinct (row 0 held counts); repeat of item 2
    np.testing.assert_allclose(got, [0.0, 0.25, 1.0, 1.0, 0.0])
    assert credibility.suspected_counts(got, rows, weights, items) == {"repeated_item": 1, "new_user": 2}


def test_zero_established_items_counts_every_event_in_full():
    rows, weights = _histories([], [3, 3])
    np.testing.assert_allclose(credibility.event_credibility(rows, weights, np.array([1, 3]), 0), [1.0, 1.0])


def test_an_item_of_new_accounts_loses_its_share_and_an_ordinary_one_keeps_it():
    table = item_evidence.empty(3)
    # item 0: 100 events, all credible; item 1: 100 events from new accounts; item 2: one new-account event
    rows = torch.tensor([0] * 100 + [1] * 100 + [2])
    credible = torch.tensor([1.0] * 100 + [0.0] * 100 + [0.0], dtype=torch.float64)
    item_evidence.observe(table, rows, torch.full((201,), 3.0, dtype=torch.float64), 0.0, credible)
    discount = item_evidence.discount(table, 3)
    assert discount[0] == 1.0
    assert discount[1] < 0.1
    assert 0.5 < discount[2] < 1.0  # one event says little: shrunk towards the stream


def test_decaying_rungs_count_credibility_and_the_all_time_rung_every_event():
    ladder = PopularityLadder((1.0,))
    counts = torch.zeros(2, ladder.rungs, dtype=torch.float64)
    ladder.observe(counts, torch.tensor([0, 1, 1]), 1000, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    assert counts[1, 0] < counts[0, 0]
    assert counts[1, -1] == 2.0 and counts[0, -1] == 1.0  # log-Q reads what was in the batches


def test_an_older_evidence_table_loads_with_its_events_credible():
    old = torch.tensor([[6.0, 2.0, 1.0]], dtype=torch.float64)
    table = item_evidence.with_credible(old)
    assert table.shape == (1, item_evidence.COLUMNS)
    assert table[0, item_evidence.CREDIBLE] == 2.0
