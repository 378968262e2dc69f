"""Item ids <-> dense rows, and item texts.

Rows are append-only and never reused, so every table indexed by row (id
embeddings, cached text features, replayed samples) stays valid as the
catalogue grows. An event may name an item before its text arrives: the item
gets a row at once and its text later.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np


class Catalogue:
    def __init__(self) -> None:
        self._row_of: dict[str, int] = {}
        self.ids: list[str] = []
        self.texts: list[Optional[str]] = []

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row_of

    def row(self, item_id: str) -> int:
        """The item's row, creating it (without text) on first sight."""
        row = self._row_of.get(item_id)
        if row is None:
            row = len(self.ids)
            self._row_of[item_id] = row
            self.ids.append(item_id)
            self.texts.append(None)
        return row

    def rows(self, item_ids: Iterable[str]) -> np.ndarray:
        return np.fromiter((self.row(i) for i in item_ids), dtype=np.int64)

    def existing_row(self, item_id: str) -> Optional[int]:
        return self._row_of.get(item_id)

    def set_text(self, item_id: str, text: str) -> tuple[int, bool]:
        """Store the newest text; returns (row, whether the text changed)."""
        row = self.row(item_id)
        changed = self.texts[row] != text
        self.texts[row] = text
        return row, changed

    def state(self) -> dict:
        return {"ids": list(self.ids), "texts": list(self.texts)}

    @classmethod
    def from_state(cls, state: dict) -> "Catalogue":
        cat = cls()
        for item_id, text in zip(state["ids"], state["texts"]):
            row = cat.row(item_id)
            cat.texts[row] = text
        return cat
