"""How much an event may move the statistics every user shares.

The popularity rungs and the trending coordinate reach every user at once, so
they are where fake accounts (or a producer replaying events under new ids)
would take over everyone's top 10. Two guards keep them robust by
construction, and neither drops an event: it still trains the model and
updates its own user's history.

* Per event, its *credibility* in [0, 1] (``event_credibility``): 0 when the
  user already has the item in their history ring (one user counts once per
  item while it stays in the ring), else how established the user is:
  distinct items in the history before the event over ``established_items``,
  at most 1. A burst of brand-new accounts hammering a few items counts little.
* Per item, a *discount* in [0, 1] (``item_discount``): the share of the
  item's events that were credible, against the stream's share, shrunk
  towards the stream's by ``PRIOR_EVENTS`` pseudo-events. An item whose events
  come mostly from users with no other history loses its shared statistics;
  one that established users turn to keeps them. Relative to the stream's own
  share, so a stream of mostly new users is not discounted as a whole.
"""

from __future__ import annotations

import numpy as np
import torch

PRIOR_EVENTS = 5.0  # pseudo-events at the stream's credible share in every item's discount


def event_credibility(hist_rows: np.ndarray, hist_weights: np.ndarray, items: np.ndarray,
                      established_items: int) -> np.ndarray:
    """[n] in [0, 1] for training samples: their newest-first histories before the event
    (``UserHistories.histories``; weight 0 marks an empty place) and the event's item row.
    ``established_items`` 0: every event counts in full."""
    n = len(items)
    if established_items <= 0 or n == 0:
        return np.ones(n, np.float64)
    held = hist_weights > 0
    repeat = ((hist_rows == np.asarray(items)[:, None]) & held).any(axis=1)
    ordered = np.sort(np.where(held, hist_rows, -1), axis=1)
    distinct = ((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum(axis=1) + (ordered[:, 0] >= 0)
    credibility = np.minimum(distinct / float(established_items), 1.0)
    return np.where(repeat, 0.0, credibility)


def suspected_counts(credibility: np.ndarray, hist_rows: np.ndarray, hist_weights: np.ndarray,
                     items: np.ndarray) -> dict[str, int]:
    """Events counted at less than full weight, by reason: ``repeated_item`` (the user had it
    already) and ``new_user`` (fewer distinct items than established)."""
    repeat = ((hist_rows == np.asarray(items)[:, None]) & (hist_weights > 0)).any(axis=1)
    return {"repeated_item": int(repeat.sum()), "new_user": int(((credibility < 1.0) & ~repeat).sum())}


def item_discount(credible: torch.Tensor, events: torch.Tensor, stream_credible: torch.Tensor,
                  stream_events: torch.Tensor) -> torch.Tensor:
    """[n] in [0, 1]: each item's credible share of its events against the stream's (all
    tensors on one device, no host sync: training reads it every step)."""
    stream_share = stream_credible / stream_events.clamp(min=1.0)
    share = (credible + PRIOR_EVENTS * stream_share) / (events + PRIOR_EVENTS)
    relative = torch.clamp(share / stream_share.clamp(min=1e-12), max=1.0)
    return torch.where(stream_events > 0, relative, torch.ones_like(relative))
