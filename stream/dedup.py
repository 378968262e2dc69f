"""Bounded memory of seen event ids: a repeated delivery changes nothing.

The window holds the newest ``capacity`` ids (oldest forgotten first). A
duplicate arriving after more than ``capacity`` newer events is no longer
recognised; size the window above the redelivery horizon you expect (a crash
replays at most one checkpoint interval of events).
"""

from __future__ import annotations

from collections import deque


class EventLedger:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: set[str] = set()
        self._order: deque[str] = deque()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; False when it was already there (a duplicate)."""
        if event_id in self._seen:
            return False
        self._seen.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self.capacity:
            self._seen.discard(self._order.popleft())
        return True

    def state(self) -> list[str]:
        return list(self._order)

    @classmethod
    def from_state(cls, capacity: int, ids: list[str]) -> "EventLedger":
        ledger = cls(capacity)
        for event_id in ids[-capacity:]:
            ledger.add(event_id)
        return ledger
