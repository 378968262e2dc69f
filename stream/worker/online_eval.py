"""Live quality, test then train: sampled events scored before they are applied.

Before a batch of events reaches the learner, a uniform sample of them is
scored as protocol P1 scores a test user (``learners/evaluation/event_rank.py``): the
rank of the event's item for its user among the catalogue minus the user's
history, under the vectors in force at that moment (the user's vector from
the history before this event, the item table served now). The same rank is
taken under decayed popularity (the model's own ladder counts, at the rung
whose half-life is one catalogue size), the peer every model must beat.

Only a user's first event in a batch is eligible (for a later one the history
before it would include events of the same batch), and of those a share
``min(1, SCORES_PER_EVENT / catalogue size)``, at most ``MAX_PER_BATCH``: the
cost per ingested event stays bounded however large the catalogue, and one
matrix product [sampled users, d] x [d, items] scores a batch. On top of that a
time budget: scoring takes at most ``TIME_SHARE`` of the loop's time (a batch
that comes while the budget is spent is not scored; which batches are skipped
depends on timing only, not on what they hold, so the sample stays uniform).
Rolling Recall@10 and NDCG@10 over the last ``--online-eval-window`` scored
events are the gauges ``recstream_online_*_at_10{scorer=...}``.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from learners.evaluation.event_rank import NO_RANK, event_ranks, ndcg_at_k, ranks_from_scores, recall_at_k
from learners.records import USER_ID_OF, Event
from stream.metrics import WorkerMetrics

SCORERS = ("model", "popularity")
# Item scores per ingested event, on average (each a product and a comparison over the vector
# dimension): what keeps ingest within 5 % of its rate without the scoring, at any catalogue size.
SCORES_PER_EVENT = 16
MAX_PER_BATCH = 32  # and at most this many events scored in one poll batch
TIME_SHARE = 0.02  # of the loop's wall time, at most, spent scoring
CREDIT_S = 0.05  # time budget an idle spell can save up: no long bursts of scoring after one


class RollingMean:
    """The mean of the last ``window`` values added, kept as a running sum over a ring."""

    def __init__(self, window: int) -> None:
        self.values = np.zeros(window, np.float64)
        self.filled = 0
        self.next = 0
        self.total = 0.0

    def extend(self, values: np.ndarray) -> None:
        window = len(self.values)
        for value in values[-window:]:
            self.total += value - self.values[self.next]
            self.values[self.next] = value
            self.next = (self.next + 1) % window
            self.filled = min(self.filled + 1, window)

    @property
    def mean(self) -> float:
        return self.total / self.filled if self.filled else float("nan")


class OnlineEval:
    def __init__(self, learner, metrics: WorkerMetrics, window: int, seed: int = 0) -> None:
        self.learner = learner
        self.metrics = metrics
        self.recall = {scorer: RollingMean(window) for scorer in SCORERS}
        self.ndcg = {scorer: RollingMean(window) for scorer in SCORERS}
        self._rng = np.random.default_rng(seed)
        self._debt_s = 0.0  # scoring time spent beyond the budget (negative: budget in hand)
        self._last = time.perf_counter()
        half_lives = np.asarray(learner.model.ladder.half_lives or (1.0,), np.float64)
        self._rung = int(np.argmin(np.abs(np.log(half_lives))))  # the half-life nearest one catalogue

    def score(self, events: Sequence[Event]) -> dict[str, np.ndarray]:
        """Rank a sample of ``events`` (valid, about to be applied; the caller holds the learner's
        lock) under each scorer; returns the ranks of the tested ones per scorer."""
        started = time.perf_counter()
        self._debt_s = max(self._debt_s - TIME_SHARE * (started - self._last), -CREDIT_S)
        self._last = started
        if self._debt_s > 0:
            return {scorer: np.zeros(0, np.int64) for scorer in SCORERS}
        try:
            return self._score(events)
        finally:
            self._debt_s += time.perf_counter() - started

    def _score(self, events: Sequence[Event]) -> dict[str, np.ndarray]:
        learner = self.learner
        catalogue = learner.catalogue
        chosen = self._sample(events, len(catalogue))
        if not chosen:
            return {scorer: np.zeros(0, np.int64) for scorer in SCORERS}
        targets = np.fromiter((_row_or_past(catalogue.existing_row(events[i].item_id)) for i in chosen),
                              np.int64, len(chosen))
        rows, weights = learner.user_histories([events[i].user_id for i in chosen])
        items = learner.item_vectors()
        ranks = {"model": event_ranks(learner.user_vectors_from(rows, weights), items, targets, rows, weights)}
        counts = self._popularity(len(items))
        ranks["popularity"] = ranks_from_scores(np.broadcast_to(counts, (len(chosen), len(counts))).copy(),
                                                targets, rows, weights)
        tested = ranks["model"] != NO_RANK
        out = {scorer: r[tested] for scorer, r in ranks.items()}
        self._record(out)
        return out

    def _sample(self, events: Sequence[Event], catalogue_size: int) -> list[int]:
        users = list(map(USER_ID_OF, events))
        # Each user's first index: built backwards, so the earliest of a user's events is the one kept.
        first = sorted(dict(zip(reversed(users), range(len(users) - 1, -1, -1))).values())
        share = min(1.0, SCORES_PER_EVENT / max(catalogue_size, 1))
        keep = np.flatnonzero(self._rng.random(len(first)) < share)
        if len(keep) > MAX_PER_BATCH:
            keep = np.sort(self._rng.choice(keep, MAX_PER_BATCH, replace=False))
        return [first[i] for i in keep]

    def _popularity(self, n_items: int) -> np.ndarray:
        counts = self.learner.model.popularity.detach()[:, self._rung].cpu().numpy()[:n_items]
        if len(counts) < n_items:  # rows the model has not grown to yet: no events counted
            counts = np.concatenate([counts, np.zeros(n_items - len(counts), counts.dtype)])
        return counts.astype(np.float32)

    def _record(self, ranks: dict[str, np.ndarray]) -> None:
        m = self.metrics
        for scorer, r in ranks.items():
            if not len(r):
                continue
            self.recall[scorer].extend(recall_at_k(r))
            self.ndcg[scorer].extend(ndcg_at_k(r))
            m.online_recall.labels(scorer=scorer).set(self.recall[scorer].mean)
            m.online_ndcg.labels(scorer=scorer).set(self.ndcg[scorer].mean)
        m.online_scored.inc(len(ranks["model"]))


def _row_or_past(row) -> int:
    """An item the catalogue does not hold yet gets a row past the table: not tested."""
    return np.iinfo(np.int64).max if row is None else row
