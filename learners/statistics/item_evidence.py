"""What an item's first few events say before they add up to popularity.

Two signals about items with little history, read from the events themselves:

* conversion: how strong the item's events are against the stream's. A click
  weighs 1, a purchase 2, a favourite 3. An item whose few events are
  purchases and favourites is picked next more often than one with as many
  clicks. The item's mean weight minus the stream's, shrunk towards 0 by
  ``PRIOR_EVENTS`` pseudo-events, so one event says little. A user's repeat
  of an item is not counted again (``learners.statistics.credibility``), so accounts that
  favourite one item over and over do not make it the stream's best.
* newness: how recently the item had its first event. It is
  exp(-events since then / catalogue size), the popularity ladder's time
  scale (``learners.statistics.popularity``), so it adapts to the stream rather than to a
  clock.

Per catalogue row the table holds five statistics: weighted counted events,
events, the stream position of the first event plus 1 (0: none yet), credible
events (the sum of how established each event's user was) and counted events
(events less users' repeats of the item). They are
counted as the ladder's counts are: never trained, saved with the model, and
the same on every rank. This module holds the arithmetic.
"""

from __future__ import annotations

import torch

from learners.statistics import credibility

COLUMNS = 5
WEIGHTED, EVENTS, FIRST, CREDIBLE, COUNTED = range(COLUMNS)
PRIOR_EVENTS = 2.0  # pseudo-events at the stream's mean weight in every item's conversion


def empty(rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A table for ``rows`` items with no events. Float64, so stream positions stay exact."""
    return torch.zeros(rows, COLUMNS, dtype=torch.float64, device=device)


def with_credible(table: torch.Tensor) -> torch.Tensor:
    """A table of an older layout (three columns) in this one: its events count as credible and counted."""
    if table.shape[1] == COLUMNS:
        return table
    events = table[:, EVENTS:EVENTS + 1]
    return torch.cat([table[:, :CREDIBLE]] + [events] * (COLUMNS - CREDIBLE), dim=1)


def stream_mean_weight(table: torch.Tensor) -> float:
    """Mean weight of the events counted so far (0 before any)."""
    counted = float(table[:, COUNTED].sum())
    return float(table[:, WEIGHTED].sum()) / counted if counted else 0.0


@torch.no_grad()
def observe(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, position: float,
            counted: torch.Tensor | None = None, established: torch.Tensor | None = None) -> None:
    """Count events of ``rows`` (in event order) with their ``weights`` into ``table``, in place.

    ``position``: events counted before this batch, stream-wide. A weight that is not a
    number (the event is no longer known) counts at the stream's mean, so it moves nothing.
    ``counted`` / ``established`` (``learners.statistics.credibility``; default 1 each): whether each event
    counts (0: the user's repeat of the item) and how established its user was."""
    if not len(rows):
        return
    rows = rows.to(table.device, torch.long)
    weights = weights.to(table.device, torch.float64)
    unknown = torch.isnan(weights)
    if bool(unknown.any()):
        known = weights[~unknown]
        mean = stream_mean_weight(table) or (float(known.mean()) if len(known) else 1.0)
        weights = torch.where(unknown, torch.full_like(weights, mean), weights)
    order = torch.arange(len(rows), dtype=torch.float64, device=table.device)
    # The first event of a row in this batch: the smallest place it appears at.
    first = torch.full((table.shape[0],), float("inf"), dtype=torch.float64, device=table.device)
    first.scatter_reduce_(0, rows, order, reduce="amin")
    new = (table[:, FIRST] == 0) & torch.isfinite(first)
    table[new, FIRST] = position + first[new] + 1.0
    ones = torch.ones_like(weights)
    counted = ones if counted is None else counted.to(table.device, torch.float64)
    established = ones if established is None else established.to(table.device, torch.float64)
    table[:, WEIGHTED].index_add_(0, rows, weights * counted)
    table[:, EVENTS].index_add_(0, rows, ones)
    table[:, CREDIBLE].index_add_(0, rows, established)
    table[:, COUNTED].index_add_(0, rows, counted)


def conversion(table: torch.Tensor, n_items: int) -> torch.Tensor:
    """[n_items]: each item's mean event weight minus the stream's, shrunk towards 0."""
    rows = table[:n_items]
    mean = stream_mean_weight(table)
    return (rows[:, WEIGHTED] - rows[:, COUNTED] * mean) / (rows[:, COUNTED] + PRIOR_EVENTS)


def newness(table: torch.Tensor, n_items: int) -> torch.Tensor:
    """[n_items] in [0, 1]: 1 for an item whose first event is the newest, fading with the events since."""
    rows = table[:n_items]
    now = float(table[:, EVENTS].sum())
    age = now - (rows[:, FIRST] - 1.0)
    seen = rows[:, FIRST] > 0
    return torch.where(seen, torch.exp(-age.clamp(min=0.0) / max(n_items, 1)), torch.zeros_like(age))


def discount(table: torch.Tensor, n_items: int) -> torch.Tensor:
    """[n_items] in [0, 1]: how much of its shared statistics each item keeps (``credibility.item_discount``)."""
    return credibility.item_discount(table[:n_items, CREDIBLE], table[:n_items, EVENTS],
                                     table[:, CREDIBLE].sum(), table[:, EVENTS].sum())
