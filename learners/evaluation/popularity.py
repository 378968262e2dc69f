"""The popularity peer: every user gets the items with the most events so far."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from learners.records import Event, Item


class PopularityRecommender:
    """Ranks items by event count (any event type); the same list for every user."""

    name = "popularity"

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.samples_trained = 0
        self.train_seconds = 0.0

    def add_items(self, items: list[Item]) -> None:
        pass  # text plays no part in popularity

    def learn(self, events: list[Event]) -> None:
        started = time.perf_counter()
        self.counts.update(event.item_id for event in events)
        self.samples_trained += len(events)
        self.train_seconds += time.perf_counter() - started

    def freeze_users(self, user_ids: list[str]) -> list[str]:
        return list(user_ids)  # no user state: the same list for everyone

    def scores(self, users: list[str], item_ids: list[str]) -> np.ndarray:
        counts = self.counts
        row = np.fromiter((counts.get(i, 0) for i in item_ids), dtype=np.float64,
                          count=len(item_ids))
        # A read-only view: no copy per user; the caller copies before masking.
        return np.broadcast_to(row, (len(users), len(item_ids)))
