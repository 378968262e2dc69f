"""Item-item scores in closed form beside the learned model, folded into the same vectors.

A linear item-item model fitted in closed form (EASE, Steck 2019) ranks a
user's next items about as well as the learned two-tower model on MovieLens,
and the two err differently: the sum of their scores ranks above both
(docs/evaluation.md). This head adds that sum to the published vectors, so
rankers and vector databases still see one dot-product space.

Fit, every time the stream has shown a tenth of the catalogue size in new
events (a cadence relative to the stream, not a time scale of one data set),
and no more often than lets fits take a fifth of the wall time:

- X: every user's history ring (``learners.state.users``): event type times the
  head's own recency (``recency`` per newer event of the same user, so no
  global half-life; slower than the user tower's, since what goes with what
  holds longer than what a user wants next), each user's largest rescaled to 1.
  Only the ``max_items`` rows with the most events in the rings take part
  (the fit costs their number cubed); others get no item-item part.
- B = I - P / diag(P), P = (X^T X + l2 I)^-1, the diagonal of B zero;
  B ~ U V^T by a seeded randomised SVD of rank r.

Score of item i for user u: cos(model) + weight * (p_u / |p_u|) . V_i / rms(V),
with p_u = sum over the history of w_j U_j. As unit vectors of one space:

    item = [a v_i,   b V_i,   sqrt(1 - a^2 - b^2 |V_i|^2)]
    user = [c m_u,   d p_u/|p_u|,   0]

with a = 1/sqrt(2), b = a / max|V|, and c, d chosen so that b d / (a c) =
weight / rms(V). The last item coordinate only tops item vectors up to unit
length; users hold 0 there, so it never scores. A user without history in
the head gets [m_u, 0, 0].

The weight is learned from the stream, not set: before each refit the head
scores the newest experience's events (which neither the model nor the head
has trained on yet) under every weight of ``WEIGHT_GRID`` and takes the one
with the best decayed NDCG@10 so far (``weigh``). Where co-occurrence says
little about what comes next, the head turns itself down, to 0 if need be.

The factors are statistics of everyone's histories, like the weights: they
hold no one user's data. Checkpoints save them (``state``), so a restored
worker publishes exactly the vectors of the version it restored.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse
import torch

_A = 1.0 / math.sqrt(2.0)  # the model part's share of an item vector
_MIN_REFIT_EVENTS = 256
# Weights the head chooses among, by how well each ranked the stream's newest events.
WEIGHT_GRID = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
VALIDATION_SAMPLES = 512
_VALIDATION_MEMORY = 0.7  # each earlier refit's evidence counts this much less


def head_dims(vector_dim: int, wanted: int) -> int:
    """Coordinates the head takes of a ``vector_dim`` vector: ``wanted``, at most half of it."""
    return max(0, min(wanted, vector_dim // 2))


@dataclass
class Factors:
    """One fit: user-side and item-side factors over the catalogue rows (zero rows outside the fit)."""

    user: np.ndarray  # [rows, rank] float32: U
    item: np.ndarray  # [rows, rank] float32: V
    max_norm: float
    rms: float
    seconds: float = 0.0  # how long the fit took


class SharedFits:
    """Fits already made, keyed by everything a fit reads, for learners that read one stream.

    A fit depends on the histories and the head's settings, never on the model, so the
    strategies of one evaluation (``learners.evaluation.strategies``) share each fit instead of
    making it once per strategy. Keeps only the fitted rows: a fit leaves all others zero.
    """

    def __init__(self) -> None:
        self._fits: dict[bytes, tuple] = {}
        self.hits = 0

    def fit(self, head: "ItemItemHead", rows: np.ndarray, weights: np.ndarray, n_items: int,
            events_seen: int) -> Factors:
        rows = np.ascontiguousarray(rows, np.int64)
        weights = np.ascontiguousarray(weights, np.float32)
        key = hashlib.blake2b(repr((head.rank, head.l2, head.max_items, head.seed, head.recency,
                                    head.history_recency, n_items, rows.shape)).encode()
                              + rows.tobytes() + weights.tobytes(), digest_size=16).digest()
        kept = self._fits.get(key)
        if kept is None:
            factors = head.fit(rows, weights, n_items, events_seen)
            fitted = np.flatnonzero(factors.user.any(1) | factors.item.any(1))
            self._fits[key] = (fitted, factors.user[fitted], factors.item[fitted],
                               factors.max_norm, factors.rms, factors.seconds)
            return factors
        self.hits += 1
        fitted, user_rows, item_rows, max_norm, rms, seconds = kept
        user = np.zeros((n_items, head.rank), np.float32)
        item = np.zeros((n_items, head.rank), np.float32)
        user[fitted], item[fitted] = user_rows, item_rows
        return Factors(user, item, max_norm, rms, seconds)


class ItemItemHead:
    def __init__(self, dims: int, weight: float, l2: float = 200.0, max_items: int = 4096,
                 seed: int = 0, refit: float = 0.1, time_share: float = 0.2,
                 recency: float = 1.0, history_recency: float = 1.0) -> None:
        """``history_recency``: the per-event decay the histories' weights carry (the user
        tower's); the fit re-bases them to ``recency``."""
        if dims < 2:
            raise ValueError("the item-item head needs at least 2 coordinates (rank 1 plus the top-up)")
        self.dims, self.rank = dims, dims - 1
        self.weight, self.l2, self.max_items = weight, l2, max_items
        self.seed, self.refit = seed, refit
        self.time_share = time_share
        self.recency, self.history_recency = recency, history_recency
        self.evidence = np.zeros(len(WEIGHT_GRID))  # decayed NDCG@10 sums per weight of WEIGHT_GRID
        self.factors: Optional[Factors] = None
        self.events_at_fit = 0
        self._fit_seconds = 0.0
        self._fitted_at = -math.inf  # monotonic time the last fit was installed
        self._user_table = torch.zeros(1, self.rank)  # U plus a zero row for rows newer than the fit

    # -- fitting ----------------------------------------------------------------------------
    def due(self, events_seen: int, n_items: int) -> bool:
        """A refit is due after ``refit`` catalogue sizes of new events, and (with ``time_share``
        > 0) once the time since the last fit is long enough for fits to take at most that share
        of the wall time: on a fast stream the cadence in events would otherwise outrun the fit."""
        if events_seen < _MIN_REFIT_EVENTS:
            return False
        if self.factors is None:
            return True
        if events_seen - self.events_at_fit < max(self.refit * n_items, _MIN_REFIT_EVENTS):
            return False
        if self.time_share <= 0:
            return True
        return time.monotonic() - self._fitted_at >= self._fit_seconds * (1.0 / self.time_share - 1.0)

    def fit(self, rows: np.ndarray, weights: np.ndarray, n_items: int, events_seen: int) -> Factors:
        """Factors from histories ``rows``/``weights`` [users, length] (newest first; see
        ``_entries`` for what the weights count). Pure: ``install`` applies it."""
        started = time.perf_counter()
        rows = np.asarray(rows, np.int64)
        weights = self._entries(weights).astype(np.float64)
        keep = weights > 0
        counts = np.bincount(rows[keep], minlength=n_items)
        # The most active rows; ties by row so the choice is deterministic.
        chosen = np.argsort(-counts, kind="stable")[: min(self.max_items, int((counts > 0).sum()))]
        user = np.zeros((n_items, self.rank), np.float32)
        item = np.zeros((n_items, self.rank), np.float32)
        if len(chosen) >= 2:
            column = np.full(n_items, -1, np.int64)
            column[chosen] = np.arange(len(chosen))
            cols = column[rows]
            inside = keep & (cols >= 0)
            users = np.broadcast_to(np.arange(len(rows))[:, None], rows.shape)
            x = scipy.sparse.csr_matrix((weights[inside], (users[inside], cols[inside])),
                                        shape=(len(rows), len(chosen)))
            # Single precision: the ridge keeps the system well conditioned, and it is twice as fast.
            gram = torch.from_numpy((x.T @ x).toarray()).float()
            gram.diagonal().add_(self.l2)
            precision = torch.cholesky_inverse(torch.linalg.cholesky(gram))
            b = -precision / precision.diagonal()
            b.fill_diagonal_(0.0)
            rank = min(self.rank, len(chosen))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                u, s, v = torch.svd_lowrank(b, q=rank, niter=2)
            root = s.clamp_min(0).sqrt()
            user[chosen, :rank] = (u * root).numpy()
            item[chosen, :rank] = (v * root).numpy()
        norms = np.linalg.norm(item, axis=1)
        used = norms[norms > 0]
        max_norm = float(used.max()) if len(used) else 0.0
        rms = float(np.sqrt((used ** 2).mean())) if len(used) else 0.0
        return Factors(user, item, max_norm, rms, time.perf_counter() - started)

    def weigh(self, model_users: np.ndarray, model_items: np.ndarray, hist_rows: np.ndarray,
              hist_weights: np.ndarray, targets: np.ndarray) -> float:
        """Choose ``weight`` by how each of ``WEIGHT_GRID`` ranks events neither part has trained on.

        Called before the model trains on these events and before the head is refit on them:
        ``model_users`` / ``model_items`` are the model's unit vectors (the users' histories
        before each event), ``targets`` the rows the users went to. Each weight's NDCG@10 over
        the events is added to its decayed evidence, and the best so far is taken. Returns it."""
        if not self.active or not len(targets):
            return self.weight
        pick = np.arange(len(targets))[-VALIDATION_SAMPLES:]
        rows, targets = np.asarray(hist_rows)[pick], np.asarray(targets)[pick]
        model = model_users[pick] @ model_items.T
        f = self.factors
        p = self._user_parts(rows, np.asarray(hist_weights)[pick])
        p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        head = p @ self._rows(f.item, np.arange(len(model_items))).T / f.rms
        seen = np.zeros_like(model, dtype=bool)
        users, places = np.nonzero(np.asarray(hist_weights)[pick] > 0)
        seen[users, rows[users, places]] = True
        seen[np.arange(len(targets)), targets] = False  # a repeat of a history item still counts
        gains = []
        for w in WEIGHT_GRID:
            scores = np.where(seen, -np.inf, model + w * head)
            rank = (scores > scores[np.arange(len(targets)), targets][:, None]).sum(1)
            gains.append(float(np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0).mean()))
        self.evidence = self.evidence * _VALIDATION_MEMORY + np.asarray(gains)
        self.weight = float(WEIGHT_GRID[int(np.argmax(self.evidence))])
        return self.weight

    def install(self, factors: Factors, events_seen: int) -> None:
        self.factors, self.events_at_fit = factors, events_seen
        self._fit_seconds, self._fitted_at = factors.seconds, time.monotonic()
        self._user_table = torch.from_numpy(np.vstack([factors.user, np.zeros((1, self.rank), np.float32)]))

    # -- vectors ------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.factors is not None and self.factors.max_norm > 0

    def items(self, model_vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Unit model item vectors [n, d] of catalogue ``rows`` -> published item vectors [n, d + dims]."""
        n = len(model_vectors)
        out = np.zeros((n, model_vectors.shape[1] + self.dims), np.float32)
        if not self.active:
            out[:, :model_vectors.shape[1]] = model_vectors
            return out
        f = self.factors
        b = _A / f.max_norm
        part = self._rows(f.item, rows) * b
        out[:, :model_vectors.shape[1]] = model_vectors * _A
        out[:, model_vectors.shape[1]:-1] = part
        out[:, -1] = np.sqrt(np.clip(1.0 - _A * _A - (part * part).sum(1), 0.0, None))
        return out

    def users(self, model_vectors: np.ndarray, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Unit model user vectors [n, d] and their histories [n, length] -> published user vectors."""
        n, d = model_vectors.shape
        out = np.zeros((n, d + self.dims), np.float32)
        out[:, :d] = model_vectors
        if not self.active or n == 0:
            return out
        f = self.factors
        p = self._user_parts(rows, weights)
        norm = np.linalg.norm(p, axis=1, keepdims=True)
        has = norm[:, 0] > 0
        ratio = self.weight * f.max_norm / f.rms  # d / c, from b d / (a c) = weight / rms
        c = 1.0 / math.sqrt(1.0 + ratio * ratio)
        out[has, :d] = model_vectors[has] * c
        out[has, d:d + self.rank] = p[has] / norm[has] * (ratio * c)
        return out

    def _user_parts(self, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """p_u = sum of w_j U_j over each history [n, length] -> [n, rank]. One C call, nothing of
        [users, length, rank] materialised: this runs for every published user. Only the direction
        of p is used, so the weights' per-user scale does not matter and they go in as they are."""
        rows = np.asarray(rows, np.int64)
        last = len(self._user_table) - 1
        rows = np.where(rows < last, rows, last)  # rows newer than the fit: the zero row
        return torch.nn.functional.embedding_bag(
            torch.from_numpy(rows), self._user_table,
            per_sample_weights=torch.from_numpy(np.ascontiguousarray(weights, np.float32)), mode="sum").numpy()

    def _entries(self, weights: np.ndarray) -> np.ndarray:
        """A history's entries as the fit counts them: event type times ``recency`` per newer
        event (the histories' weights, newest first, re-based from ``history_recency``),
        rescaled so that each user's largest is 1, 0 on empty places."""
        weights = np.asarray(weights, np.float32)
        if not weights.size:
            return weights.copy()
        filled = weights > 0
        # In logs: the re-basing factor grows as fast as the histories' weights shrink.
        logs = np.log(np.where(filled, weights, 1.0).astype(np.float64))
        logs += np.arange(weights.shape[-1]) * math.log(self.recency / self.history_recency)
        logs = np.where(filled, logs, -np.inf)
        top = logs.max(axis=-1, keepdims=True)
        entries = np.exp(logs - np.where(np.isfinite(top), top, 0.0))
        return np.where(filled, entries, 0.0).astype(np.float32)

    @staticmethod
    def _rows(table: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows of a factor table; rows past it (items first seen since the fit) are zero."""
        rows = np.asarray(rows, np.int64)
        inside = rows < len(table)
        out = np.zeros((len(rows), table.shape[1]), np.float32)
        out[inside] = table[rows[inside]]
        return out

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        if self.factors is None:
            return {}
        f = self.factors
        return {"user": torch.from_numpy(f.user), "item": torch.from_numpy(f.item),
                "stats": torch.tensor([f.max_norm, f.rms, float(self.events_at_fit), self.weight], dtype=torch.float64),
                "evidence": torch.from_numpy(self.evidence.copy())}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.factors, self.events_at_fit = None, 0
            return
        max_norm, rms, at, weight = (float(v) for v in state["stats"])
        self.install(Factors(state["user"].numpy().copy(), state["item"].numpy().copy(), max_norm, rms), int(at))
        self.weight = weight
        self.evidence = state["evidence"].numpy().copy()
