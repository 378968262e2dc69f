"""What fake accounts can move of the statistics every user shares (learners.statistics.credibility)."""

from __future__ import annotations

import numpy as np
import torch

from learners.statistics import credibility, item_evidence
from learners.statistics.popularity import PopularityLadder


def _histories(*rows_per_user: list[int], length: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rows = np.zeros((len(rows_per_user), length), np.int64)
    weights = np.zeros((len(rows_per_user), length), np.float32)
    for i, held in enumerate(rows_per_user):
        rows[i, :len(held)] = held
        weights[i, :len(held)] = 1.0 / max(len(held), 1)
    return rows, weights


def test_a_user_counts_once_per_item_and_is_established_by_distinct_items():
    rows, weights = _histories([], [1, 1, 1], [1, 2, 3, 4], [5, 6, 7, 8, 9, 0], [2, 3])
    got = credibility.event_credibility(rows, weights, np.array([7, 4, 9, 4, 2]), established_items=4)
    np.testing.assert_allclose(got.counted, [1, 1, 1, 1, 0])  # the last user had item 2 already
    # new user; 1 distinct item; 4; 6 (row 0 held counts); a repeat
    np.testing.assert_allclose(got.established, [0.0, 0.25, 1.0, 1.0, 0.0])
    assert credibility.suspected_counts(got) == {"repeated_item": 1, "new_user": 2}


def test_zero_established_items_counts_every_event_in_full():
    rows, weights = _histories([], [3, 3])
    got = credibility.event_credibility(rows, weights, np.array([1, 3]), 0)
    np.testing.assert_allclose(got.counted, [1.0, 1.0])
    np.testing.assert_allclose(got.established, [1.0, 1.0])


def _discount(established_per_item: list[list[float]]) -> torch.Tensor:
    table = item_evidence.empty(len(established_per_item))
    rows = torch.tensor([i for i, events in enumerate(established_per_item) for _ in events])
    established = torch.tensor([e for events in established_per_item for e in events], dtype=torch.float64)
    item_evidence.observe(table, rows, torch.full((len(rows),), 3.0, dtype=torch.float64), 0.0,
                          torch.ones(len(rows), dtype=torch.float64), established)
    return item_evidence.discount(table, len(established_per_item))


def test_an_item_of_new_accounts_loses_its_counts_and_one_newcomers_start_with_keeps_them():
    discount = _discount([[1.0] * 100, [0.1] * 100, [0.6] * 50 + [1.0] * 50, [0.0]])
    assert discount[0] == 1.0  # established users only
    assert discount[1] < 0.3  # new accounts only
    assert discount[2] == 1.0  # half of its events from users still new: within the tolerated share
    assert discount[3] == 1.0  # one event of a new user says little: shrunk towards the stream


def test_decaying_rungs_leave_repeats_out_and_the_all_time_rung_counts_every_event():
    ladder = PopularityLadder((1.0,))
    counts = torch.zeros(2, ladder.rungs, dtype=torch.float64)
    ladder.observe(counts, torch.tensor([0, 1, 1]), 1000, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    assert counts[1, 0] < counts[0, 0] + 1e-3
    assert counts[1, -1] == 2.0 and counts[0, -1] == 1.0  # log-Q reads what was in the batches


def test_an_older_evidence_table_loads_with_its_events_credible_and_counted():
    table = item_evidence.with_credible(torch.tensor([[6.0, 2.0, 1.0]], dtype=torch.float64))
    assert table.shape == (1, item_evidence.COLUMNS)
    assert table[0, item_evidence.CREDIBLE] == 2.0 and table[0, item_evidence.COUNTED] == 2.0
    assert table[0, item_evidence.WEIGHTED] == 6.0
