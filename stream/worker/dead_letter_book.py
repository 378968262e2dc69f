"""Which bad records already reached the dead-letter topic, and where a restart reads it from.

Shared by the parts that send dead letters (publisher), skip re-read records
(ingest) and checkpoint (checkpointer): a record re-read after a restart or a
rollback is never dead-lettered twice (stream/kafka/recovery.py).
"""

from __future__ import annotations

from typing import Callable, Iterable

from stream.kafka.recovery import Source


class DeadLetterBook:
    def __init__(self) -> None:
        self._sent: set[Source] = set()  # sources in the dead-letter topic whose offsets may be read again
        self._positions: dict[int, int] = {}  # dead-letter partition -> where a restart starts reading it
        self.positions_known = False  # False: a restart reads the dead-letter topic from its beginning

    def claim(self, source: Source) -> bool:
        """True the first time ``source`` goes to the dead-letter topic, False if it is there already."""
        if source in self._sent:
            return False
        self._sent.add(source)
        return True

    def remember(self, sources: Iterable[Source]) -> None:
        self._sent.update(sources)

    @property
    def sent(self) -> frozenset[Source]:
        return frozenset(self._sent)

    def forget(self, drop: Callable[[Source], bool]) -> None:
        """Forget the sources ``drop`` selects (offsets never read again)."""
        self._sent = {source for source in self._sent if not drop(source)}

    @property
    def positions(self) -> dict[int, int]:
        return dict(self._positions)

    def advance(self, positions: dict[int, int]) -> None:
        """Move the restart positions forward (never back)."""
        for partition, offset in positions.items():
            self._positions[int(partition)] = max(self._positions.get(int(partition), 0), int(offset))
