"""A click-fraud burst must not reach every user's top 10; a genuine trend must still spread.

The stream is one where what users pick is mostly what is hot right now, and the model's
learned part is held still (a learning rate of ~0): what every user sees of an item then
comes from the statistics all users share (popularity rungs, trending coordinate), the
place where a burst of fake accounts reaches everyone at once. 300 new accounts favourite
3 new items 10 times each amid 1,500 real events (benchmarks/fraud_burst.py plays the same
on MovieLens with the model learning).
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from learners.evaluation import fraud
from learners.learner import ContinualRecommender, LearnerConfig
from learners.records import Event, Item
from stream.config import default_model_path

pytestmark = pytest.mark.integration

TARGETS = ["new-1", "new-2", "new-3"]


def hot_world(n_items: int = 300, n_users: int = 300, n: int = 4800, every: int = 150, hot: int = 5):
    """Most events go to the few items hot this stretch of the stream; the hot set moves on."""
    rng = random.Random(0)
    events, current = [], []
    for k in range(n):
        if k % every == 0:
            current = rng.sample(range(n_items), hot)
        item = rng.choice(current) if rng.random() < 0.8 else rng.randrange(n_items)
        events.append(Event(f"e-{k}", f"user-{rng.randrange(n_users)}", f"item-{item}",
                            rng.choices(("click", "purchase", "favourite"), (6, 3, 1))[0], float(k)))
    items = [Item(f"item-{i}", f"Item {i} of kind {i % 7}") for i in range(n_items)]
    return events, items + [Item(t, f"Item {t} of kind 3") for t in TARGETS]


@pytest.fixture(scope="module")
def play():
    events, items = hot_world()
    warm, during, after = events[:3000], events[3000:4500], events[4500:]
    active = sorted({e.user_id for e in after})
    trend_users = [u for u, _ in Counter(e.user_id for e in warm).most_common(100)]
    encoder = []

    def run(kind: str, **config) -> dict[str, float]:
        base = LearnerConfig(model_path=default_model_path(), device="cpu", seed=0, learning_rate=1e-9)
        learner = ContinualRecommender(dataclasses.replace(base, **config), *encoder)
        encoder[:] = [learner.encoder]
        learner.add_items(items)
        rng = random.Random(0)
        middle = fraud.burst(during, TARGETS, 300, 10, rng) if kind == "burst" \
            else fraud.trend(during, TARGETS, trend_users * 3, rng)
        stream = warm + middle + after
        for start in range(0, len(stream), 512):
            learner.observe_many(stream[start:start + 512])
            learner.learn()
        others = [u for u in active if u not in set(trend_users)]
        return {"active": fraud.reach(learner, active, TARGETS), "others": fraud.reach(learner, others, TARGETS)}

    return run


def test_a_burst_of_new_accounts_reaches_at_most_5_percent_of_real_users(play):
    assert play("burst")["active"] <= 0.05


def test_the_same_burst_takes_over_without_the_defence(play):
    # What the test above guards against: every event counted in full on the shared statistics.
    assert play("burst", established_user_items=0)["active"] >= 0.5


def test_a_trend_of_established_users_still_reaches_their_neighbours(play):
    assert play("trend")["others"] >= 0.8
