"""The items' evidence: how strong an item's events are, and how new it is to the stream."""

from __future__ import annotations

import math

import numpy as np
import torch

from learners.statistics import item_evidence
from learners.state.users import UserHistories

CLICK, PURCHASE, FAVOURITE = 1.0, 2.0, 3.0


def _observe(table, rows, weights) -> None:
    position = float(table[:, item_evidence.EVENTS].sum())
    item_evidence.observe(table, torch.tensor(rows), torch.tensor(weights, dtype=torch.float64), position)


def test_conversion_is_the_items_mean_weight_against_the_streams_shrunk_by_few_events():
    table = item_evidence.empty(5)
    _observe(table, [0, 0, 0, 1, 1, 1, 2, 3], [FAVOURITE] * 3 + [CLICK] * 3 + [FAVOURITE, PURCHASE])
    mean = (3 * FAVOURITE + 3 * CLICK + FAVOURITE + PURCHASE) / 8
    assert item_evidence.stream_mean_weight(table) == mean
    conversion = item_evidence.conversion(table, 5)
    assert conversion[0] > conversion[2] > 0 > conversion[1]  # three favourites say more than one
    expected = (3 * FAVOURITE - 3 * mean) / (3 + item_evidence.PRIOR_EVENTS)
    assert math.isclose(float(conversion[0]), expected)
    assert conversion[4] == 0  # no events: nothing said


def test_newness_fades_with_the_events_since_the_first_in_catalogue_sizes():
    n_items = 4
    table = item_evidence.empty(n_items)
    _observe(table, [0, 0, 0, 0], [CLICK] * 4)
    _observe(table, [1, 0, 0, 2], [CLICK] * 4)  # item 1 first at position 4, item 2 at 7; 8 events in all
    newness = item_evidence.newness(table, n_items)
    assert newness[3] == 0  # never seen
    assert math.isclose(float(newness[2]), math.exp(-1 / n_items))
    assert math.isclose(float(newness[1]), math.exp(-4 / n_items))
    assert math.isclose(float(newness[0]), math.exp(-8 / n_items))
    # A catalogue ten times larger turns over ten times slower.
    assert math.isclose(float(item_evidence.newness(table, 40)[0]), math.exp(-8 / 40))


def test_an_unknown_weight_counts_at_the_streams_mean_and_moves_no_conversion():
    table = item_evidence.empty(3)
    _observe(table, [0, 1], [FAVOURITE, CLICK])
    before = item_evidence.conversion(table, 3)[:2].clone()
    _observe(table, [2, 2], [float("nan"), float("nan")])
    assert item_evidence.stream_mean_weight(table) == 2.0
    assert item_evidence.conversion(table, 3)[2] == 0
    assert torch.equal(item_evidence.conversion(table, 3)[:2], before)


def test_the_ring_gives_each_events_weight_while_it_holds_it():
    users = UserHistories(length=2, max_users=8)
    slots = users.append_many(["a", "a", "b"], [5, 6, 7], [CLICK, FAVOURITE, PURCHASE], first_seq=10)
    users.append("a", 8, PURCHASE, 13)  # the ring of 2 drops a's first event (seq 10)
    weights = users.weights_at(np.array(slots), np.array([10, 11, 12]))
    assert np.isnan(weights[0]) and weights[1] == FAVOURITE and weights[2] == PURCHASE
    assert np.isnan(users.weights_at(np.array([-1]), np.array([12]))[0])  # no slot
