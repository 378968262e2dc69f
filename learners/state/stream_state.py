"""The learner's hold on the stream, as a checkpoint saves and restores it (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StreamState:
    """What a learner holds of the stream besides users, catalogue and weights: what a checkpoint
    saves of it (``ContinualRecommender.snapshot``) and puts back (``ContinualRecommender.restore``)."""
    model_version: int
    event_seq: int  # events observed so far: the next event's sequence number
    pending: list[tuple[int, int, int]]  # samples waiting for training: (user slot, event seq, item row)
    published: np.ndarray  # the item vectors last handed out for publishing, one row per item
    refresh_cursor: int  # where the next update's sweep of item vectors starts
    samples_shed: int
