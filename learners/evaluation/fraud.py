"""A click-fraud burst and a genuine trend, and how far either reaches other users' top 10.

``burst``: brand-new accounts each favouriting a few target items over and over, interleaved
at random places with real events. ``trend``: established users each favouriting one of
the targets once. ``reach``: the share of given users with a target in their top K (the dot
product over the newest item vectors, minus the user's own items), what a ranker reading
the published vectors would show them. ``benchmarks/fraud_burst.py`` and the tests drive them.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from learners.records import Event


def burst(real: Sequence[Event], targets: Sequence[str], users: int, per_user: int,
          rng: random.Random, prefix: str = "fraud") -> list[Event]:
    """``users`` new accounts, ``per_user`` favourites each, cycling over ``targets``."""
    fake = [Event(f"{prefix}-{u}-{k}", f"{prefix}-user-{u}", targets[k % len(targets)], "favourite", 0.0)
            for u in range(users) for k in range(per_user)]
    return interleave(real, fake, rng)


def trend(real: Sequence[Event], targets: Sequence[str], users: Sequence[str], rng: random.Random) -> list[Event]:
    """Each of ``users`` favourites one target once."""
    extra = [Event(f"trend-{i}", user, targets[i % len(targets)], "favourite", 0.0) for i, user in enumerate(users)]
    return interleave(real, extra, rng)


def interleave(real: Sequence[Event], extra: list[Event], rng: random.Random) -> list[Event]:
    """``extra`` at random places among ``real`` (whose order is kept)."""
    places = sorted(rng.randrange(len(real) + 1) for _ in extra)
    extra = list(extra)
    rng.shuffle(extra)
    out, at = [], 0
    for place, event in zip(places, extra):
        out.extend(real[at:place])
        out.append(event)
        at = place
    out.extend(real[at:])
    return out


def reach(learner, users: Sequence[str], targets: Sequence[str], k: int = 10) -> float:
    """Share of ``users`` with at least one of ``targets`` in their top ``k`` (a ``ContinualRecommender``)."""
    if not users:
        return 0.0
    items = learner.item_vectors()
    target_rows = np.asarray(learner.catalogue.rows(targets))
    rows, weights = learner.user_histories(list(users))
    scores = learner.user_vectors(list(users)) @ items.T
    hits = 0
    for i in range(len(users)):
        scores[i, rows[i][weights[i] > 0]] = -np.inf  # the user's own items (empty places weigh 0)
        top = np.argpartition(-scores[i], k)[:k]
        hits += bool(np.isin(target_rows, top).any())
    return hits / len(users)
