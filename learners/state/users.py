"""Bounded per-user interaction history.

Each user owns a slot: a ring of the last ``length`` events (item row, event
weight, global event sequence number). Writing an event is a handful of
scalar stores, so ingest stays cheap; user vectors and training samples are
built later, vectorised over many users at once.

Memory bound: at most ``max_users`` slots; when full, the least recently
active user is evicted (their next event starts a fresh history).

Besides the ring, each user can keep a *profile*: a uniform reservoir sample
(Algorithm R) of ``profile_length`` of all their events, however many there
were. Training samples are built from the ring (what came right before the
event); published user vectors are built from the profile (``histories_of``),
so a user's vector reflects their whole history at a fixed memory cost, and
what they did a while ago is still in it after they moved on to other things.
With ``profile_length`` 0 the ring serves both.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import numpy as np

_EMPTY = -1
_ROW = np.int32  # catalogue rows: half the memory (and checkpoint bytes) of int64


def _draw(slot: int, seen: int) -> int:
    """A pseudo-random draw fixed by (slot, event number): the reservoir needs no RNG state,
    so a restored checkpoint keeps sampling exactly as the uninterrupted run would."""
    x = (seen * 0x9E3779B1 + slot * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    return x ^ (x >> 12)


def owner_tag(user_id: str) -> int:
    """A signed 64-bit tag naming a user's training samples (the replay reservoir keeps it
    beside each sample, so erasing the user can find them); never 0, which means "unknown"."""
    tag = int.from_bytes(hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8,
                                         person=b"recstream-user").digest(), "little", signed=True)
    return tag or 1


class UserHistories:
    def __init__(self, length: int, max_users: int, recency_decay: float = 0.97, profile_length: int = 0) -> None:
        self.length = length
        self.max_users = max_users
        self.recency_decay = recency_decay
        self.profile_length = profile_length
        self._slot_of: "OrderedDict[str, int]" = OrderedDict()
        self._free: list[int] = []
        capacity = min(1024, max_users)
        self._rows = np.full((capacity, length), _EMPTY, dtype=_ROW)
        self._weights = np.zeros((capacity, length), dtype=np.float32)
        self._seq = np.full((capacity, length), _EMPTY, dtype=np.int64)
        self._count = np.zeros(capacity, dtype=np.int64)
        self._prows = np.zeros((capacity, profile_length), dtype=np.int32)
        self._pweights = np.zeros((capacity, profile_length), dtype=np.float32)
        # owner_tag of the user in each slot (0: free), hashed once when the user takes the slot:
        # every experience reads it for its samples. Derived from the ids, so not checkpointed.
        self._tags = np.zeros(capacity, dtype=np.int64)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._slot_of

    def remove(self, user_id: str) -> Optional[int]:
        """Erase a user: their ring and profile are cleared and their slot is free again.
        Returns the slot they had (None: not held). Their next event starts a new history."""
        slot = self._slot_of.pop(user_id, None)
        if slot is None:
            return None
        self._clear(slot)
        self._free.append(slot)
        return slot

    def owner_tags(self, slots: np.ndarray) -> np.ndarray:
        """``owner_tag`` of the user holding each slot now (0 for a free slot)."""
        return self._tags[np.asarray(slots, dtype=np.int64)]

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
        self._tags[slot] = owner_tag(user_id)
        return slot

    def _clear(self, slot: int) -> None:
        self._rows[slot] = _EMPTY
        self._seq[slot] = _EMPTY
        self._weights[slot] = 0.0
        self._count[slot] = 0
        self._prows[slot] = 0
        self._pweights[slot] = 0.0
        self._tags[slot] = 0

    def _grow(self) -> None:
        new = min(self.max_users, max(1024, 2 * len(self._count)))  # a checkpoint may hold none
        extra = new - len(self._count)
        self._rows = np.concatenate([self._rows, np.full((extra, self.length), _EMPTY, _ROW)])
        self._weights = np.concatenate([self._weights, np.zeros((extra, self.length), np.float32)])
        self._seq = np.concatenate([self._seq, np.full((extra, self.length), _EMPTY, np.int64)])
        self._count = np.concatenate([self._count, np.zeros(extra, np.int64)])
        self._prows = np.concatenate([self._prows, np.zeros((extra, self.profile_length), np.int32)])
        self._pweights = np.concatenate([self._pweights, np.zeros((extra, self.profile_length), np.float32)])
        self._tags = np.concatenate([self._tags, np.zeros(extra, np.int64)])

    def append(self, user_id: str, item_row: int, weight: float, seq: int) -> int:
        """Record one event; returns the user's slot."""
        slot = self._slot(user_id)
        seen = int(self._count[slot])
        pos = seen % self.length
        self._rows[slot, pos] = item_row
        self._weights[slot, pos] = weight
        self._seq[slot, pos] = seq
        self._count[slot] = seen + 1
        if self.profile_length:
            keep = seen if seen < self.profile_length else _draw(slot, seen) % (seen + 1)
            if keep < self.profile_length:
                self._prows[slot, keep] = item_row
                self._pweights[slot, keep] = weight
        return slot

    def replace(self, user_id: str, item_rows: Sequence[int], weights: Sequence[float], first_seq: int) -> int:
        """Start the user's history over from these events (oldest first, sequence numbers from
        ``first_seq``), in the slot they hold (training samples queued for it stay theirs)."""
        slot = self._slot(user_id)
        self._clear(slot)
        self._tags[slot] = owner_tag(user_id)
        for i, (row, weight) in enumerate(zip(item_rows, weights)):
            self.append(user_id, int(row), float(weight), first_seq + i)
        return slot

    def append_many(self, user_ids: list[str], item_rows: list[int], weights: list[float], first_seq: int) -> list[int]:
        """``append`` for a batch of events in order (sequence numbers from ``first_seq``): the
        same state as one by one, with the ring writes done as one vectorised store each
        (on the ingest path the scalar numpy stores were most of an event's cost)."""
        n = len(user_ids)
        if self.profile_length or len(self._slot_of) + n > self.max_users:
            # The profile reservoir draws per event, and an eviction inside the batch could hand
            # a slot written earlier in it to another user: one by one.
            return [self.append(u, r, w, first_seq + i) for i, (u, r, w) in enumerate(zip(user_ids, item_rows, weights))]
        slots, positions = [], []
        counts: dict[int, int] = {}  # slot -> events seen, this batch included
        for user_id in user_ids:
            slot = self._slot(user_id)  # may grow the arrays: read them after the loop
            seen = counts.get(slot)
            if seen is None:
                seen = int(self._count[slot])
            counts[slot] = seen + 1
            slots.append(slot)
            positions.append(seen % self.length)
        touched = np.fromiter(counts.keys(), np.int64, len(counts))
        after = np.fromiter(counts.values(), np.int64, len(counts))
        index = (np.array(slots, np.int64), np.array(positions, np.int64))
        if n > self.length and int((after - self._count[touched]).max()) > self.length:
            # A user with more events than the ring in this batch: stores in order, last wins.
            for i in range(n):
                at = (slots[i], positions[i])
                self._rows[at], self._weights[at], self._seq[at] = item_rows[i], weights[i], first_seq + i
        else:
            self._rows[index] = item_rows
            self._weights[index] = weights
            self._seq[index] = np.arange(first_seq, first_seq + n)
        self._count[touched] = after
        return slots

    def slot_of(self, user_id: str) -> int:
        return self._slot_of.get(user_id, _EMPTY)

    # -- reading ------------------------------------------------------------
    def histories(self, slots: np.ndarray, before_seq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Item rows and normalised weights of the given slots, [n, length] each, newest first.

        With ``before_seq``, only events older than that sequence number count
        (the history a training sample saw when its event happened). Position 0
        is the newest event kept, then older ones; empty places come last, with
        row 0 and weight 0 (the user tower reads the order). Newer events weigh
        more (``recency_decay`` per step of age) and weights sum to 1 per user.
        """
        slots = np.asarray(slots, dtype=np.int64)
        n = len(slots)
        if n == 0:
            return np.zeros((0, self.length), np.int64), np.zeros((0, self.length), np.float32)
        valid_slot = slots >= 0
        safe = np.where(valid_slot, slots, 0)
        count = np.where(valid_slot, self._count[safe], 0)
        # The ring is written at count % length, so newest first is a walk back from the last
        # write: no sort. Events at or after ``before_seq`` are the newest ones, skipped.
        skip = np.zeros(n, np.int64)
        if before_seq is not None:
            seq = self._seq[safe]
            skip = ((seq >= np.asarray(before_seq, dtype=np.int64)[:, None]) & (seq >= 0)).sum(axis=1)
        rank = np.arange(self.length)[None, :]
        keep = rank < (np.minimum(count, self.length) - skip)[:, None]
        places = (count[:, None] - 1 - skip[:, None] - rank) % self.length
        rows = self._rows[safe[:, None], places]
        weights = self._weights[safe[:, None], places]
        weights = np.where(keep, weights * self.recency_decay ** rank, 0.0).astype(np.float32)
        total = weights.sum(axis=1, keepdims=True)
        weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
        rows = np.where(keep, rows, 0).astype(np.int64)
        return rows, weights

    def weights_at(self, slots: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        """The event weight of each (slot, sequence number), NaN where the ring no longer holds it."""
        slots = np.asarray(slots, dtype=np.int64)
        if not len(slots):
            return np.zeros(0, np.float64)
        safe = np.where(slots >= 0, slots, 0)
        match = (self._seq[safe] == np.asarray(seqs, dtype=np.int64)[:, None]) & (slots >= 0)[:, None]
        found = match.any(axis=1)
        weights = np.where(match, self._weights[safe], 0.0).sum(axis=1)
        return np.where(found, weights, np.nan)

    def histories_of(self, user_ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """What published user vectors are made of: each user's profile (uniform over their
        whole history, event weights kept, summing to 1), or their ring without a profile."""
        slots = np.fromiter((self._slot_of.get(u, _EMPTY) for u in user_ids), dtype=np.int64)
        if not self.profile_length:
            return self.histories(slots)
        valid = slots >= 0
        safe = np.where(valid, slots, 0)
        filled = np.minimum(self._count[safe], self.profile_length)
        keep = (np.arange(self.profile_length)[None, :] < filled[:, None]) & valid[:, None]
        weights = np.where(keep, self._pweights[safe], 0.0).astype(np.float32)
        total = weights.sum(axis=1, keepdims=True)
        weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
        return np.where(keep, self._prows[safe], 0).astype(np.int64), weights

    def item_rows_of(self, user_id: str) -> np.ndarray:
        slot = self._slot_of.get(user_id)
        if slot is None:
            return np.zeros(0, np.int64)
        keep = self._seq[slot] >= 0
        return self._rows[slot][keep].astype(np.int64)

    # -- checkpoints --------------------------------------------------------
    def state(self) -> dict:
        slots = np.fromiter(self._slot_of.values(), np.int64, len(self._slot_of))
        n = int(slots.max()) + 1 if len(slots) else 0  # slots past the last used one hold nothing
        return {"user_ids": list(self._slot_of), "slots": slots,
                "rows": self._rows[:n], "weights": self._weights[:n], "seq": self._seq[:n], "count": self._count[:n],
                "profile_rows": self._prows[:n], "profile_weights": self._pweights[:n],
                "length": self.length, "evictions": self.evictions}

    def load_state(self, state: dict) -> None:
        if int(state["length"]) != self.length:
            raise ValueError("history length differs from the checkpoint's")
        self._rows = np.array(state["rows"], dtype=_ROW); self._weights = np.array(state["weights"])
        self._seq = np.array(state["seq"]); self._count = np.array(state["count"])
        self._slot_of = OrderedDict(zip(state["user_ids"], (int(s) for s in state["slots"])))
        used = set(self._slot_of.values())
        self._free = [s for s in range(len(self._count)) if s not in used]
        self.evictions = int(state["evictions"])
        n = len(self._count)
        self._tags = np.zeros(n, np.int64)
        for user_id, slot in self._slot_of.items():
            self._tags[slot] = owner_tag(user_id)
        prows, pweights = state.get("profile_rows"), state.get("profile_weights")
        if prows is not None and pweights is not None and np.shape(prows) == (n, self.profile_length):
            self._prows = np.array(prows, dtype=np.int32)
            self._pweights = np.array(pweights, dtype=np.float32)
        else:  # a checkpoint without profiles (or of another length): start them from the rings
            self._prows = np.zeros((n, self.profile_length), np.int32)
            self._pweights = np.zeros((n, self.profile_length), np.float32)
            if self.profile_length:
                order = np.argsort(np.where(self._seq >= 0, self._seq, np.iinfo(np.int64).max), axis=1, kind="stable")
                take = min(self.length, self.profile_length)
                self._prows[:, :take] = np.take_along_axis(self._rows, order, axis=1)[:, :take]
                self._pweights[:, :take] = np.take_along_axis(self._weights, order, axis=1)[:, :take]


def rings(state: dict, user_ids: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each user's ring as it was written, read from a ``UserHistories.state()`` (a live one or a
    checkpoint's copy): item rows and raw event weights, oldest first. Users not held (or with no
    event) are left out. Appending them in this order to an empty history (``replace``) rebuilds it."""
    slot_of = dict(zip(state["user_ids"], np.asarray(state["slots"]).tolist()))
    users = [user_id for user_id in dict.fromkeys(user_ids) if user_id in slot_of]
    if not users:
        return {}
    length = int(state["length"])
    slots = np.fromiter((slot_of[u] for u in users), np.int64, len(users))
    count = np.asarray(state["count"])[slots]
    kept = np.minimum(count, length)
    # The ring is written at count % length: its oldest kept event sits ``kept`` writes back.
    places = (count[:, None] - kept[:, None] + np.arange(length)[None, :]) % length
    rows = np.asarray(state["rows"])[slots[:, None], places]
    weights = np.asarray(state["weights"])[slots[:, None], places]
    return {user: (rows[i, :k], weights[i, :k]) for i, (user, k) in enumerate(zip(users, kept.tolist())) if k}


def histories_by_id(state: dict, item_ids: Sequence[str], user_ids: Iterable[str]) \
        -> dict[str, tuple[list[str], list[float]]]:
    """``rings`` with item ids for rows (``item_ids``: the catalogue's ids by row): a history another
    learner, with rows of its own, can adopt."""
    found = rings(state, user_ids)
    if not found:
        return {}
    ids = np.asarray(item_ids, dtype=object)
    return {user: (ids[rows].tolist(), weights.tolist()) for user, (rows, weights) in found.items()}
