"""Why a user's vector points where it does, and what the user already has.

A user vector is read from the user's history rows and weights
(``ContinualRecommender.user_histories``: recency and event type folded in,
summing to 1 per user). An item's share of the weight of the user's newest
events, summed over its events, says how much it shaped the vector; the
largest few go out with the vector (the ``because`` payload field,
docs/formats.md) so a reader can say which of them a recommendation is
closest to. The distinct items of the newest events, newest first, go out too
(``recent_items``), so a reader can leave out what the user already has.
Vectorised over the batch of users a publish window sends: one ``np.unique``
and one sort, no per-event work.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Sequence

import numpy as np

BECAUSE_ITEMS = 3
# The newest events looked at: at the user tower's recency (0.97 an event) they carry 86 % of a
# history's weight, and a publish batch reads them in a fifth of the time a 256-event ring takes.
BECAUSE_WINDOW = 64
_DECIMALS = 4


def history_items(item_ids: Sequence[str], rows: np.ndarray, weights: np.ndarray, n: int = BECAUSE_ITEMS,
                  recent: int = 0) -> tuple[list[list[tuple[str, float]]], list[list[str]]]:
    """Per user (a row of ``rows`` / ``weights``, newest first): the ``n`` heaviest items
    (``heaviest_items``) and up to ``recent`` distinct items of the newest
    ``max(BECAUSE_WINDOW, recent)`` events, newest first; empty lists for an empty history."""
    window = max(BECAUSE_WINDOW, recent)
    rows = np.asarray(rows, dtype=np.int64)[:, :window]
    weights = np.asarray(weights, dtype=np.float64)[:, :window]
    users = rows.shape[0]
    heaviest: list[list[tuple[str, float]]] = [[] for _ in range(users)]
    newest: list[list[str]] = [[] for _ in range(users)]
    if users == 0 or (n <= 0 and recent <= 0):
        return heaviest, newest
    width = max(int(rows.max(initial=0)) + 1, 1)
    held = weights > 0
    # Row-major, so each user's events stay newest first: an item's first index is its newest event.
    keys = (np.arange(users, dtype=np.int64)[:, None] * width + rows)[held]
    unique, inverse = np.unique(keys, return_inverse=True)
    owner, item_row = unique // width, unique % width
    if n > 0:
        counted = weights if weights.shape[1] <= BECAUSE_WINDOW else np.where(
            np.arange(weights.shape[1]) < BECAUSE_WINDOW, weights, 0.0)
        _fill_heaviest(heaviest, item_ids, owner, item_row,
                       np.bincount(inverse, weights=counted[held], minlength=len(unique)), users, n)
    if recent > 0:
        _fill_newest(newest, item_ids, keys, inverse, len(unique), width, recent)
    return heaviest, newest


def _fill_heaviest(out, item_ids, owner, item_row, sums, users: int, n: int) -> None:
    counted = sums > 0  # items seen only past BECAUSE_WINDOW weigh nothing here
    owner, item_row, sums = owner[counted], item_row[counted], sums[counted]
    totals = np.bincount(owner, weights=sums, minlength=users)
    order = np.lexsort((-sums, owner))  # per user, heaviest first (ties: lower row first)
    owner, item_row = owner[order], item_row[order]
    share = np.round(sums[order] / totals[owner], _DECIMALS)
    kept = np.arange(len(owner)) - np.searchsorted(owner, owner) < n  # place within the user's list
    names = _names(item_ids, item_row[kept])
    for user, name, weight in zip(owner[kept].tolist(), names, share[kept].tolist()):
        out[user].append((name, weight))


def _fill_newest(out, item_ids, keys, inverse, distinct: int, width: int, recent: int) -> None:
    # Each (user, item)'s newest event is its first index in ``keys``; keeping those in place
    # keeps every user's items newest first, with no sort.
    first = np.full(distinct, len(keys), np.int64)
    np.minimum.at(first, inverse, np.arange(len(keys)))
    is_first = np.zeros(len(keys), bool)
    is_first[first] = True
    owner, item_row = np.divmod(keys[is_first], width)
    counts = np.bincount(owner, minlength=len(out))
    starts = np.cumsum(counts) - counts
    kept = np.arange(len(owner)) - np.repeat(starts, counts) < recent  # place within the user's list
    names = _names(item_ids, item_row[kept])
    start = 0
    for user, count in enumerate(np.minimum(counts, recent).tolist()):
        if count:
            out[user] = names[start:start + count]
            start += count


def _names(item_ids: Sequence[str], item_rows: np.ndarray) -> list[str]:
    """The ids of these catalogue rows, looked up in C (the lists run to a user's ``recent`` each)."""
    if len(item_rows) < 2:
        return [item_ids[r] for r in item_rows.tolist()]
    return list(itemgetter(*item_rows.tolist())(item_ids))


def heaviest_items(item_ids: Sequence[str], rows: np.ndarray, weights: np.ndarray,
                   n: int = BECAUSE_ITEMS) -> list[list[tuple[str, float]]]:
    """Per user (a row of ``rows`` / ``weights``, newest first), the ``n`` items of largest summed
    weight among the newest ``BECAUSE_WINDOW`` events, heaviest first, as (item id, share of the
    user's weight there); an empty list for an empty history."""
    return history_items(item_ids, rows, weights, n)[0]


def top_history_items(learner, user_ids: Sequence[str], n: int = BECAUSE_ITEMS) -> list[list[tuple[str, float]]]:
    """``heaviest_items`` of these users' histories in ``learner`` (a ``ContinualRecommender``)."""
    return learner_history_items(learner, user_ids, n)[0]


def learner_history_items(learner, user_ids: Sequence[str], n: int = BECAUSE_ITEMS, recent: int = 0) \
        -> tuple[list[list[tuple[str, float]]], list[list[str]]]:
    """``history_items`` of these users' histories in ``learner`` (a ``ContinualRecommender``)."""
    rows, weights = learner.user_histories(user_ids)
    return history_items(learner.catalogue.ids, rows, weights, n, recent)
