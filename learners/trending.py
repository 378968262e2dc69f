"""Items that are busy now but barely known yet: one coordinate of the published vectors.

Among items with few events the learned parts know little (an id row of a few
optimizer steps, a short text), and the users' mix of popularity rungs leans on
the longer rungs, which for such items are near zero. What ranks them best is
how busy they are right now: the shortest popularity rung's count, faded as the
item gathers events of all time (``PopularityLadder.rising``; ``EVIDENCE``
events halve it). docs/evaluation.md measures it on several slices and seeds.

It is added to the scores with one weight for every user, at publishing only
(the model trains without it), as one more coordinate of unit vectors:

    item = [sqrt(1 - q_i^2) v_i,  q_i]       q_i = ITEM_SHARE * rising_i
    user = [sqrt(1 - z^2)   u,    z]         z / sqrt(1 - z^2) = weight / ITEM_SHARE

so that score = sqrt(1 - z^2) (sqrt(1 - q_i^2) u.v + weight * rising_i): the
rest of the vectors' score plus ``weight`` times the item's rising value. The
coordinate is always there (the layout does not depend on the weight); with
weight 0 it is 0 in every vector.
"""

from __future__ import annotations

import math

import numpy as np

DIMS = 1
EVIDENCE = 10.0  # all-time events at which an item's rising value is halved
ITEM_SHARE = 0.5  # the largest value of the item coordinate: keeps most of a busy item's other parts


class TrendingCoordinate:
    def __init__(self, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"the trending weight must be >= 0, got {weight}")
        self.weight = weight
        self._user_value = weight / math.sqrt(ITEM_SHARE * ITEM_SHARE + weight * weight)

    def items(self, vectors: np.ndarray, rising: np.ndarray) -> np.ndarray:
        """Unit item vectors [n, d] and their rising values [n] in [0, 1] -> unit vectors [n, d + 1]."""
        q = (ITEM_SHARE * np.clip(rising, 0.0, 1.0) if self.weight > 0 else np.zeros(len(vectors))).astype(np.float32)
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
