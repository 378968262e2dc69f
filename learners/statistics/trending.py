"""Items that are busy now but barely known yet: one coordinate of the published vectors.

Among items with few events the learned parts know little (an id row of a few
optimizer steps, a short text), and the users' mix of popularity rungs leans on
the longer rungs, which for such items are near zero. What ranks them best is
what their events say directly (``item_value``):

* how busy they are right now: the shortest popularity rung's count, faded as
  the item gathers events of all time (``PopularityLadder.rising``;
  ``EVIDENCE`` events halve it);
* how strong their events are against the stream's (``item_evidence.conversion``);
* how new they are to the stream (``item_evidence.newness``).

It is added to the scores with one weight for every user, at publishing only
(the model trains without it), as one more coordinate of unit vectors:

    item = [sqrt(1 - q_i^2) v_i,  q_i]       q_i = ITEM_SHARE * value_i
    user = [sqrt(1 - z^2)   u,    z]         z / sqrt(1 - z^2) = weight / ITEM_SHARE

so that score = sqrt(1 - z^2) (sqrt(1 - q_i^2) u.v + weight * value_i): the
rest of the vectors' score plus ``weight`` times the item's value. The
coordinate is always there (the layout does not depend on the weight); with
weight 0 it is 0 in every vector. docs/evaluation.md measures it on several
slices and seeds.
"""

from __future__ import annotations

import math

import numpy as np

DIMS = 1
EVIDENCE = 10.0  # all-time events at which an item's rising value is halved
ITEM_SHARE = 0.5  # the largest value of the item coordinate: keeps most of a busy item's other parts
CONVERSION = 0.1  # what an item's conversion (mean event weight over the stream's) adds to its value
NEWNESS = 0.1  # what being new to the stream adds to an item's value


def item_value(rising: np.ndarray, conversion: np.ndarray, newness: np.ndarray) -> np.ndarray:
    """[n] in [-1, 1]: the item side of the coordinate, from its rising value, conversion and newness."""
    value = rising + CONVERSION * conversion + NEWNESS * newness
    return np.clip(value, -1.0, 1.0).astype(np.float32)


class TrendingCoordinate:
    def __init__(self, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"the trending weight must be >= 0, got {weight}")
        self.weight = weight
        self._user_value = weight / math.sqrt(ITEM_SHARE * ITEM_SHARE + weight * weight)

    def items(self, vectors: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Unit item vectors [n, d] and their values [n] in [-1, 1] (``item_value``) -> unit vectors [n, d + 1]."""
        q = (ITEM_SHARE * np.clip(values, -1.0, 1.0) if self.weight > 0 else np.zeros(len(vectors))).astype(np.float32)
        out = np.empty((len(vectors), vectors.shape[1] + DIMS), np.float32)
        out[:, :-1] = vectors * np.sqrt(1.0 - q * q)[:, None]
        out[:, -1] = q
        return out

    def users(self, vectors: np.ndarray) -> np.ndarray:
        """Unit user vectors [n, d] -> unit vectors [n, d + 1]."""
        z = self._user_value
        out = np.empty((len(vectors), vectors.shape[1] + DIMS), np.float32)
        out[:, :-1] = vectors * math.sqrt(1.0 - z * z)
        out[:, -1] = z
        return out
