"""Cached text features per catalogue row.

``frozen[row]`` is what the frozen bottom of the encoder made of the item's
text (computed once per text). ``pooled[row]`` is the full encoder's output
for it, refreshed by running only the trainable top over ``frozen[row]``.
Rows without text have ``has_text`` False and contribute no text part.
"""

from __future__ import annotations

from typing import Optional

import torch


class ItemFeatures:
    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.frozen: list[Optional[torch.Tensor]] = []
        self.pooled = torch.zeros(0, hidden_size)
        self.has_text = torch.zeros(0, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.frozen)

    def ensure_rows(self, n: int) -> None:
        extra = n - len(self.frozen)
        if extra <= 0:
            return
        self.frozen.extend([None] * extra)
        grow = max(extra, len(self.pooled))  # amortised doubling
        if n > len(self.pooled):
            self.pooled = torch.cat([self.pooled, torch.zeros(grow, self.hidden_size)])
            self.has_text = torch.cat([self.has_text, torch.zeros(grow, dtype=torch.bool)])

    def set_frozen(self, row: int, feature: torch.Tensor) -> None:
        self.ensure_rows(row + 1)
        self.frozen[row] = feature
        self.has_text[row] = True

    def rows_with_text(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[self.has_text[rows]]
