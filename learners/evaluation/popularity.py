"""The popularity peers: every user gets the items with the most events so far.

``popularity`` counts every event alike; ``decayed_pop`` (``half_life`` set)
halves each count every ``half_life`` events, so the list follows what is
popular now.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from learners.records import Event, Item


class PopularityRecommender:
    """Ranks items by event count (any event type), decayed when ``half_life`` (events) is set."""

    def __init__(self, half_life: Optional[float] = None) -> None:
        self.name = "popularity" if half_life is None else "decayed_pop"
        self.decay = 1.0 if half_life is None else 0.5 ** (1.0 / half_life)
        self.counts: dict[str, float] = {}
        self.samples_trained = 0
        self.train_seconds = 0.0

    def add_items(self, items: list[Item]) -> None:
        pass  # text plays no part in popularity

    def learn(self, events: list[Event]) -> None:
        started = time.perf_counter()
        counts, decay, n = self.counts, self.decay, len(events)
        if decay < 1.0:
            scale = decay ** n
            for key in counts:
                counts[key] *= scale
        for age, event in zip(range(n - 1, -1, -1), events):
            counts[event.item_id] = counts.get(event.item_id, 0.0) + decay ** age
        self.samples_trained += n
        self.train_seconds += time.perf_counter() - started

    def freeze_users(self, user_ids: list[str]) -> list[str]:
        return list(user_ids)  # no user state: the same list for everyone

    def scores(self, users: list[str], item_ids: list[str]) -> np.ndarray:
        counts = self.counts
        row = np.fromiter((counts.get(i, 0.0) for i in item_ids), dtype=np.float64, count=len(item_ids))
        # A read-only view: no copy per user; the caller copies before masking.
        return np.broadcast_to(row, (len(users), len(item_ids)))
