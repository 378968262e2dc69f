"""Catalogue rows every rank agrees on, for training one model across ranks.

Rows are handed out in the order ids are first seen, and ranks see new ids in
different orders (events name items before their text arrives; each rank reads
the items topic at its own pace), so without agreement the id tables of two
ranks would mean different items at the same row. With a collective, an id
the catalogue does not hold yet gets no row on sight: the item text or event
naming it waits here. At the start of every round the ranks gather the ids
each saw since the last one and give them rows in one order (rank order, then
first sight), the same on every rank; then what waited is applied.

A user's later events wait behind one that waits, so every user's history
keeps the stream's order.
"""

from __future__ import annotations

from typing import Sequence

from learners.records import Event, Item


class RowAgreement:
    def __init__(self) -> None:
        self._new: dict[str, None] = {}  # ids seen without a row, in order of first sight
        self._items: dict[str, Item] = {}  # texts of such ids, the last one wins
        self._events: list[Event] = []
        self._users: set[str] = set()  # users with a waiting event

    @property
    def waiting(self) -> bool:
        """Ids wait for rows: the next round must agree on them before training."""
        return bool(self._new)

    @property
    def waiting_events(self) -> int:
        return len(self._events)

    def admit_events(self, events: Sequence[Event], catalogue) -> Sequence[Event]:
        """The events that may be applied now; the rest wait for the next agreement."""
        users = self._users
        if not users and all(e.item_id in catalogue for e in events):
            return events
        now = []
        for event in events:
            if event.user_id in users or event.item_id not in catalogue:
                if event.item_id not in catalogue:
                    self._new.setdefault(event.item_id)
                self._events.append(event)
                users.add(event.user_id)
            else:
                now.append(event)
        return now

    def admit_items(self, items: Sequence[Item], catalogue) -> list[Item]:
        """The item texts that may be applied now (their id has a row); the rest wait."""
        now = []
        for item in items:
            if item.item_id in catalogue:
                now.append(item)
            else:
                self._new.setdefault(item.item_id)
                self._items[item.item_id] = item
        return now

    def drop_user(self, user_id: str) -> int:
        """Forget the waiting events of an erased user; returns how many."""
        if user_id not in self._users:
            return 0
        kept = [e for e in self._events if e.user_id != user_id]
        dropped = len(self._events) - len(kept)
        self._events = kept
        self._users.discard(user_id)
        return dropped

    def agree(self, collective, catalogue) -> tuple[list[Item], list[Event]]:
        """Every rank: rows for the ids any rank saw, in one order; returns what waited for them
        (texts first, then events in arrival order), to be applied by the caller."""
        for ids in collective.gather_objects(list(self._new)):
            for item_id in ids:
                catalogue.row(item_id)
        items, events = list(self._items.values()), self._events
        self._new, self._items, self._events, self._users = {}, {}, [], set()
        return items, events


__all__ = ["RowAgreement"]
