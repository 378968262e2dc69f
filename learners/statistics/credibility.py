"""How much an event may move the statistics every user shares.

The popularity rungs and the trending coordinate reach every user at once, so
they are where fake accounts (or a producer replaying events under new ids)
would take over everyone's top 10. Two guards keep them robust by
construction, and neither drops an event: it still trains the model and
updates its own user's history.

* One account, one count per item: an event whose item is already in the
  user's history ring is not counted again (``Credibility.counted``).
* An item's statistics are scaled by a *discount* (``item_discount``) read
  from who its events came from. Each event carries how established its user
  was (``Credibility.established``: distinct items in the history before it
  over ``established_items``, at most 1). An item whose events come mostly
  from users with no other history keeps a small part of its counts (the
  square of its share over the tolerated one); one whose credible share is at
  least ``TOLERATED_SHARE`` of the stream's keeps all of them. Relative to the stream's own share, so a stream of mostly new users is
  not discounted as a whole, and items that newcomers usually start with (a
  catalogue's best known) keep their counts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

PRIOR_EVENTS = 5.0  # pseudo-events at the stream's credible share in every item's discount
TOLERATED_SHARE = 0.5  # an item at this share of the stream's credible share or above keeps all its counts


class Credibility(NamedTuple):
    counted: np.ndarray  # [n] 1, or 0 for an item the user already has
    established: np.ndarray  # [n] in [0, 1]: how established the user was; 0 for a repeat


def event_credibility(hist_rows: np.ndarray, hist_weights: np.ndarray, items: np.ndarray,
                      established_items: int) -> Credibility:
    """Per training sample: its newest-first history before the event (``UserHistories.histories``;
    weight 0 marks an empty place) and the event's item row. ``established_items`` 0: every
    event counts in full."""
    n = len(items)
    if established_items <= 0 or n == 0:
        return Credibility(np.ones(n, np.float64), np.ones(n, np.float64))
    held = hist_weights > 0
    repeat = ((hist_rows == np.asarray(items)[:, None]) & held).any(axis=1)
    ordered = np.sort(np.where(held, hist_rows, -1), axis=1)
    distinct = ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum(axis=1) + (ordered[:, 0] >= 0)
    established = np.where(repeat, 0.0, np.minimum(distinct / float(established_items), 1.0))
    return Credibility((~repeat).astype(np.float64), established)


def suspected_counts(credibility: Credibility) -> dict[str, int]:
    """Events counted at less than full weight, by reason: ``repeated_item`` (the user had it
    already) and ``new_user`` (fewer distinct items than established)."""
    repeat = credibility.counted == 0
    return {"repeated_item": int(repeat.sum()), "new_user": int(((credibility.established < 1.0) & ~repeat).sum())}


def item_discount(credible: torch.Tensor, events: torch.Tensor, stream_credible: torch.Tensor,
                  stream_events: torch.Tensor) -> torch.Tensor:
    """[n] in [0, 1]: each item's credible share of its events against ``TOLERATED_SHARE`` of the
    stream's (all tensors on one device, no host sync: training reads it every step)."""
    stream_share = stream_credible / stream_events.clamp(min=1.0)
    share = (credible + PRIOR_EVENTS * stream_share) / (events + PRIOR_EVENTS)
    relative = torch.clamp(share / (TOLERATED_SHARE * stream_share).clamp(min=1e-12), max=1.0)
    # Squared: an item well below the tolerated share (a burst's) keeps next to nothing.
    return torch.where(stream_events > 0, relative * relative, torch.ones_like(relative))
