"""The worker's consumers (events, items, forget requests), shared by the parts that read from them (set once connected)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stream.kafka.clients import KafkaSource
from stream.kafka.items import ItemsFollower


@dataclass
class Consumers:
    events: Optional[KafkaSource] = None
    items: Optional[ItemsFollower] = None
    forget: Optional[ItemsFollower] = None

    def item_offsets(self, default: dict[int, int]) -> dict[int, int]:
        """The next item offset per partition read so far (``default`` before connecting)."""
        return self.items.offsets if self.items is not None else default
