"""Item popularity at several time scales, each relative to the catalogue.

What is popular "now" carries much of what users pick next, but how fast
"now" moves differs from stream to stream: a fixed half-life in events that
suits one data set is wrong for another. So the ladder keeps one decayed
event count per rung, with half-lives that are multiples of the catalogue
size (``half_lives``; 0.25 = a quarter of the catalogue size in events). A
stream with a small catalogue turns over faster in events, and its rungs
shrink with it. Which rungs matter is not chosen here: the model reads all
of them as features and the user tower learns how much each user trusts
which (see ``learners.towers.model``). One more rung counts all events ever (no
decay): the training-target frequencies the log-Q correction needs.

Counts are statistics, never trained: they move with the stream, not with
gradients. The model keeps them as a [rows, rungs] parameter without gradient
(``TwoTower.popularity``), so they grow with the id tables and a checkpoint
restores them exactly; this class holds the arithmetic.
"""

from __future__ import annotations

import torch


def parse_half_lives(text: str) -> tuple[float, ...]:
    """``"0.25,1,4"`` -> (0.25, 1.0, 4.0): half-lives in catalogue sizes, each > 0."""
    values = tuple(float(part) for part in str(text).split(",") if part.strip())
    if any(v <= 0 for v in values):
        raise ValueError(f"popularity half-lives must be > 0 (catalogue sizes), got {text!r}")
    return values


class PopularityLadder:
    def __init__(self, half_lives: tuple[float, ...]) -> None:
        self.half_lives = tuple(half_lives)
        self.rungs = len(self.half_lives) + 1  # the last one never decays

    def decays(self, catalogue_size: int) -> torch.Tensor:
        """Per-event decay factor of each rung for a catalogue of this size."""
        scale = float(max(catalogue_size, 1))
        per_rung = [0.5 ** (1.0 / (h * scale)) for h in self.half_lives] + [1.0]
        return torch.tensor(per_rung, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, counts: torch.Tensor, rows: torch.Tensor, catalogue_size: int,
                counted: torch.Tensor | None = None) -> None:
        """Count events of ``rows`` (in event order) into ``counts`` [rows, rungs], in place.

        ``counted`` (default 1 each): how much each event counts on the decaying rungs. The
        all-time rung counts every event: it is the training batches' item frequency (log-Q)."""
        n = len(rows)
        if n == 0:
            return
        decay = self.decays(catalogue_size)  # float64: decay ** n underflows gracefully, not to garbage
        ages = torch.arange(n - 1, -1, -1, dtype=torch.float64)
        added = decay[None, :] ** ages[:, None]
        if counted is not None:
            added[:, :-1] *= counted.to(torch.float64)[:, None]
        counts.mul_((decay ** n).to(counts.dtype))
        counts.index_add_(0, rows.to(counts.device), added.to(counts.dtype))

    def features(self, counts: torch.Tensor, rows: torch.Tensor, n_items: int) -> torch.Tensor:
        """[len(rows), rungs] in [0, 1]: log-scaled count over the catalogue's highest, per rung."""
        if not len(counts):
            return torch.zeros(len(rows), self.rungs, device=rows.device)
        # All on the device, no float() of the maxima: on a GPU that would wait for every queued step.
        top = torch.log1p(counts[: max(n_items, 1)].max(dim=0).values)
        return torch.log1p(counts[rows]) / torch.where(top > 0, top, torch.ones_like(top))

    def rising(self, counts: torch.Tensor, n_items: int, evidence: float) -> torch.Tensor:
        """[n_items] in [0, 1]: how busy each item is now, for items with little history yet.

        The shortest rung's log-scaled count (``features``), faded by ``evidence / (evidence +
        all-time events)``: an item with a handful of events, most of them recent, scores high;
        an item whose count the longer rungs already carry scores near 0."""
        rows = torch.arange(max(n_items, 0), device=counts.device)
        shortest = min(range(len(self.half_lives)), key=self.half_lives.__getitem__) if self.half_lives else -1
        busy = self.features(counts, rows, n_items)[:, shortest]
        return busy * (evidence / (evidence + counts[rows, -1]))

    @staticmethod
    def frequency(counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Share of all events so far that went to each of ``rows`` (0 before any event)."""
        total = counts[:, -1].sum()
        return counts[rows, -1] / torch.clamp(total, min=1.0)
