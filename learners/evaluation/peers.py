"""The simple peers a learned ranker has to beat, as ``recstream evaluate`` strategies.

``decayed_pop``: items ranked by event counts that halve every 5,000 events,
the same list for every user (``learners.evaluation.popularity``). ``ease``: EASE (Steck 2019), a closed-form
item-item model (L2 = 200) refit on the binary user-item matrix before every
block. ``ease_rw``: the same refit on entries weighted 0.5^(age / 20,000
events), the age counted from the user's last event with the item. The
constants are those of the reference table the project is compared with
(``../shared/BASELINES.md``), so the figures match it; they are fixed, not
tuned per data set.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from learners.evaluation.popularity import PopularityRecommender
from learners.records import Event, Item

_NEVER_SEEN = -1e9  # items no history holds yet rank last


class EASERecommender:
    """EASE refit before every block; ``half_life`` (events) weights entries by recency, None = binary."""

    def __init__(self, half_life: Optional[float] = None, l2: float = 200.0) -> None:
        self.name = "ease" if half_life is None else "ease_rw"
        self.half_life, self.l2 = half_life, l2
        self.last: dict[str, dict[str, int]] = {}  # user -> item -> sequence number of the last event
        self.seq = 0
        self.columns: dict[str, int] = {}
        self.weights = np.zeros((0, 0), np.float32)
        self.samples_trained = 0
        self.train_seconds = 0.0

    def add_items(self, items: list[Item]) -> None:
        pass  # EASE reads interactions only

    def _entries(self, sequence_numbers: np.ndarray) -> np.ndarray:
        if self.half_life is None:
            return np.ones(len(sequence_numbers))
        return 0.5 ** ((self.seq - sequence_numbers) / self.half_life)

    def learn(self, events: list[Event]) -> None:
        started = time.perf_counter()
        for event in events:
            self.last.setdefault(event.user_id, {})[event.item_id] = self.seq
            self.seq += 1
        self.samples_trained += len(events)
        self.columns = {i: c for c, i in enumerate(sorted({i for h in self.last.values() for i in h}))}
        x = np.zeros((len(self.last), len(self.columns)), np.float64)
        for r, history in enumerate(self.last.values()):
            cols = [self.columns[i] for i in history]
            x[r, cols] = self._entries(np.fromiter(history.values(), np.float64))
        gram = x.T @ x
        gram[np.diag_indices_from(gram)] += self.l2
        inverse = np.linalg.inv(gram)
        weights = -inverse / np.diag(inverse)
        weights[np.diag_indices_from(weights)] = 0.0
        self.weights = weights.astype(np.float32)
        self.train_seconds += time.perf_counter() - started

    def freeze_users(self, user_ids: list[str]) -> list[dict[str, int]]:
        return [dict(self.last.get(u, {})) for u in user_ids]

    def scores(self, users: list[dict[str, int]], item_ids: list[str]) -> np.ndarray:
        x = np.zeros((len(users), len(self.columns)), np.float32)
        for r, history in enumerate(users):
            cols = [self.columns[i] for i in history]
            x[r, cols] = self._entries(np.fromiter(history.values(), np.float64))
        known = x @ self.weights
        out = np.full((len(users), len(item_ids)), _NEVER_SEEN, np.float32)
        at = [(j, self.columns[i]) for j, i in enumerate(item_ids) if i in self.columns]
        if at:
            dst, src = map(list, zip(*at))
            out[:, dst] = known[:, src]
        return out


PEERS = {
    "decayed_pop": lambda: PopularityRecommender(half_life=5_000.0),
    "ease": lambda: EASERecommender(half_life=None),
    "ease_rw": lambda: EASERecommender(half_life=20_000.0),
}
"""Peer name -> a fresh recommender (no settings: the reference definitions)."""
