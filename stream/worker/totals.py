"""The worker's own accounting, shared by its parts and kept in every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class Totals:
    """consumed = valid + dead-lettered + duplicates; items counts item texts applied."""
    consumed: int = 0
    valid: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    items: int = 0

    def load(self, values: dict) -> None:
        """Take the values a checkpoint holds (a field it lacks starts at its default)."""
        for f in fields(self):
            setattr(self, f.name, int(values.get(f.name, f.default)))
