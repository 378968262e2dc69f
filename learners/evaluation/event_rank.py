"""One event at a time, the question protocol P1 asks: where does the event's item rank for its user?

Candidates are the catalogue minus the items in the user's history, as in
P1 step 3; an event whose item is already in that history asks nothing (P1
tests items new to the user) and gets no rank. Equal scores rank by the
lower catalogue row, as P1's ``top_k`` does. The online figures of the worker
(``stream/worker/online_eval.py``) and the update guard (``learners/continual/guard.py``)
both read these ranks.
"""

from __future__ import annotations

import numpy as np
import torch

K = 10
NO_RANK = -1  # the event's item is in the user's history (or outside the catalogue): not tested


def event_ranks(users: np.ndarray, items: np.ndarray, targets: np.ndarray, history_rows: np.ndarray,
                history_weights: np.ndarray) -> np.ndarray:
    """0-based rank of ``targets[i]`` among ``items`` for ``users[i]``, history rows excluded.

    ``users`` [n, d], ``items`` [m, d] (or scores from any scorer: see ``ranks_from_scores``),
    ``history_*`` [n, length] as the learner's histories give them (weight 0: an empty place)."""
    if not len(users):
        return np.zeros(0, np.int64)
    # torch's product: numpy's BLAS threads were ten times slower on a busy CPU.
    scores = (torch.from_numpy(np.ascontiguousarray(users)) @ torch.from_numpy(np.ascontiguousarray(items)).T).numpy()
    return ranks_from_scores(scores, targets, history_rows, history_weights)


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray, history_rows: np.ndarray,
                      history_weights: np.ndarray) -> np.ndarray:
    """``event_ranks`` from a [n, m] score matrix (changed in place: history cells are excluded)."""
    n, m = scores.shape
    targets = np.asarray(targets, np.int64)
    out = np.full(n, NO_RANK, np.int64)
    inside = targets < m
    known = history_weights > 0
    seen = (history_rows == targets[:, None]) & known
    tested = inside & ~seen.any(axis=1)
    if not tested.any():
        return out
    rows = np.flatnonzero(tested)
    scores = scores[rows]
    scores[np.isnan(scores)] = -np.inf  # broken weights rank their items last, never first
    target_scores = scores[np.arange(len(rows)), targets[rows]][:, None]
    user_of, place = np.nonzero(known[rows] & (history_rows[rows] < m))
    scores[user_of, history_rows[rows][user_of, place]] = -np.inf
    ahead = (scores > target_scores).sum(axis=1)
    tied = ((scores == target_scores) & (np.arange(m)[None, :] < targets[rows][:, None])).sum(axis=1)
    out[rows] = ahead + tied
    return out


def recall_at_k(ranks: np.ndarray, k: int = K) -> np.ndarray:
    """Per tested event: 1 when its item is in the top k (one true item: hits / min(k, 1))."""
    return (ranks < k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int = K) -> np.ndarray:
    """Per tested event: binary-gain NDCG@k with one true item (the ideal DCG is 1)."""
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def ndcg_full(ranks: np.ndarray) -> np.ndarray:
    """NDCG without a cutoff: every rank counts, so a few hundred events tell two models apart."""
    return 1.0 / np.log2(ranks + 2.0)
