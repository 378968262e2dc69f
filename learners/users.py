"""Bounded per-user interaction history.

Each user owns a slot: a ring of the last ``length`` events (item row, event
weight, global event sequence number). Writing an event is a handful of
scalar stores, so ingest stays cheap; user vectors and training samples are
built later, vectorised over many users at once.

Memory bound: at most ``max_users`` slots; when full, the least recently
active user is evicted (their next event starts a fresh history).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import numpy as np

_EMPTY = -1


class UserHistories:
    def __init__(self, length: int, max_users: int, recency_decay: float = 0.97) -> None:
        self.length = length
        self.max_users = max_users
        self.recency_decay = recency_decay
        self._slot_of: "OrderedDict[str, int]" = OrderedDict()
        self._free: list[int] = []
        capacity = min(1024, max_users)
        self._rows = np.full((capacity, length), _EMPTY, dtype=np.int64)
        self._weights = np.zeros((capacity, length), dtype=np.float32)
        self._seq = np.full((capacity, length), _EMPTY, dtype=np.int64)
        self._count = np.zeros(capacity, dtype=np.int64)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._slot_of

    def user_ids(self) -> list[str]:
        return list(self._slot_of)

    # -- writing ------------------------------------------------------------
    def _slot(self, user_id: str) -> int:
        slot = self._slot_of.get(user_id)
        if slot is not None:
            self._slot_of.move_to_end(user_id)
            return slot
        if len(self._slot_of) >= self.max_users:
            _, slot = self._slot_of.popitem(last=False)
            self.evictions += 1
            self._clear(slot)
        elif self._free:
            slot = self._free.pop()
        else:
            slot = len(self._slot_of)
            if slot >= len(self._count):
                self._grow()
        self._slot_of[user_id] = slot
        return slot

    def _clear(self, slot: int) -> None:
        self._rows[slot] = _EMPTY
        self._seq[slot] = _EMPTY
        self._weights[slot] = 0.0
        self._count[slot] = 0

    def _grow(self) -> None:
        new = min(self.max_users, 2 * len(self._count))
        extra = new - len(self._count)
        self._rows = np.concatenate([self._rows, np.full((extra, self.length), _EMPTY, np.int64)])
        self._weights = np.concatenate([self._weights, np.zeros((extra, self.length), np.float32)])
        self._seq = np.concatenate([self._seq, np.full((extra, self.length), _EMPTY, np.int64)])
        self._count = np.concatenate([self._count, np.zeros(extra, np.int64)])

    def append(self, user_id: str, item_row: int, weight: float, seq: int) -> int:
        """Record one event; returns the user's slot."""
        slot = self._slot(user_id)
        pos = self._count[slot] % self.length
        self._rows[slot, pos] = item_row
        self._weights[slot, pos] = weight
        self._seq[slot, pos] = seq
        self._count[slot] += 1
        return slot

    def slot_of(self, user_id: str) -> int:
        return self._slot_of.get(user_id, _EMPTY)

    # -- reading ------------------------------------------------------------
    def histories(self, slots: np.ndarray, before_seq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Item rows and normalised weights of the given slots, [n, length] each.

        With ``before_seq``, only events older than that sequence number count
        (the history a training sample saw when its event happened). Empty
        places have row 0 and weight 0. Newer events weigh more
        (``recency_decay`` per step of age) and weights sum to 1 per user.
        """
        slots = np.asarray(slots, dtype=np.int64)
        n = len(slots)
        if n == 0:
            return np.zeros((0, self.length), np.int64), np.zeros((0, self.length), np.float32)
        valid_slot = slots >= 0
        safe = np.where(valid_slot, slots, 0)
        rows = self._rows[safe]
        seq = self._seq[safe]
        weights = self._weights[safe].copy()
        keep = (seq >= 0) & valid_slot[:, None]
        if before_seq is not None:
            keep &= seq < np.asarray(before_seq, dtype=np.int64)[:, None]
        # Age rank: 0 for the newest kept event of each user.
        order = np.where(keep, seq, np.iinfo(np.int64).min)
        rank = np.argsort(np.argsort(-order, axis=1, kind="stable"), axis=1, kind="stable")
        weights = np.where(keep, weights * self.recency_decay ** rank, 0.0).astype(np.float32)
        total = weights.sum(axis=1, keepdims=True)
        weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
        rows = np.where(keep, rows, 0)
        return rows, weights

    def histories_of(self, user_ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        slots = np.fromiter((self._slot_of.get(u, _EMPTY) for u in user_ids), dtype=np.int64)
        return self.histories(slots)

    def item_rows_of(self, user_id: str) -> np.ndarray:
        slot = self._slot_of.get(user_id)
        if slot is None:
            return np.zeros(0, np.int64)
        keep = self._seq[slot] >= 0
        return self._rows[slot][keep]

    # -- checkpoints --------------------------------------------------------
    def state(self) -> dict:
        n = len(self._count)
        return {"user_ids": list(self._slot_of), "slots": np.fromiter(self._slot_of.values(), np.int64, len(self._slot_of)),
                "rows": self._rows[:n], "weights": self._weights[:n], "seq": self._seq[:n], "count": self._count[:n],
                "length": self.length, "evictions": self.evictions}

    def load_state(self, state: dict) -> None:
        if int(state["length"]) != self.length:
            raise ValueError("history length differs from the checkpoint's")
        self._rows = np.array(state["rows"]); self._weights = np.array(state["weights"])
        self._seq = np.array(state["seq"]); self._count = np.array(state["count"])
        self._slot_of = OrderedDict(zip(state["user_ids"], (int(s) for s in state["slots"])))
        used = set(self._slot_of.values())
        self._free = [s for s in range(len(self._count)) if s not in used]
        self.evictions = int(state["evictions"])
