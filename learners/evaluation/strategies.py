"""Every evaluation strategy (docs/formats.md) as a P1 ``Recommender``, built on the one learner.

All learner strategies (naive, ewc, replay, ewc_replay, joint) drive
``ContinualRecommender`` exactly as the worker does: events are observed in
time order and trained in experiences of ``experience_size`` events. They
share one encoder's frozen bottom and one cache of its outputs, so the
catalogue is encoded once per evaluation, not once per strategy; and one store
of the item-item head's fits, which depend on the stream alone.

Publishing item vectors from averaged weights (``serving_average``) is one of
the product's protections against forgetting, so only ``ewc_replay`` (the
product) has it, and ``avalanche_ewc_replay`` (Avalanche's own EWC and replay
plugins, ``learners.continual.avalanche_plugins``), so that beside the product only the
plugins differ: ``naive``, ``ewc``, ``replay`` and ``joint`` publish from
their live weights, and each row isolates its own mechanism.

The peers (``popularity``, ``decayed_pop``, ``ease``, ``ease_rw``:
``learners.evaluation.peers``) need no encoder.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple, Optional

import numpy as np

from learners.encoder import TextEncoder, resolve_device
from learners.evaluation.peers import PEERS
from learners.evaluation.popularity import PopularityRecommender
from learners.statistics.item_item import SharedFits
from learners.learner import ContinualRecommender, LearnerConfig
from learners.records import EVENT_WEIGHTS, Event, Item, encoder_text

LEARNER_STRATEGIES = ("naive", "ewc", "replay", "ewc_replay", "avalanche_ewc_replay")
PRODUCT = "ewc_replay"
# Publishes from averaged weights as the product does, so beside it only the plugins differ.
AVERAGED = (PRODUCT, "avalanche_ewc_replay")
ALL_STRATEGIES = ("popularity", *PEERS, "frozen", *LEARNER_STRATEGIES, "joint")


class LearnerRecommender:
    """A continual strategy: each block is one more stretch of the stream."""

    def __init__(self, name: str, config: LearnerConfig, encoder: TextEncoder, frozen_cache: dict,
                 experience_size: int, shared_fits: Optional[SharedFits] = None) -> None:
        self.name = name
        average = config.serving_average if name in AVERAGED else 0.0
        # Refits of the item-item head by the event count alone: a wall-time budget would make runs differ.
        self.learner = ContinualRecommender(dataclasses.replace(config, strategy=name, serving_average=average,
                                                                item_item_time_share=0.0), encoder,
                                            shared_fits=shared_fits)
        self._frozen_cache = frozen_cache
        self.experience_size = experience_size
        self.train_seconds = 0.0

    @property
    def samples_trained(self) -> int:
        return self.learner.parts.stats.samples

    def add_items(self, items: list[Item]) -> None:
        self.learner.add_items(items, self._frozen_cache)

    def learn(self, events: list[Event]) -> None:
        started = time.perf_counter()
        for start in range(0, len(events), self.experience_size):
            for event in events[start:start + self.experience_size]:
                self.learner.observe(event)
            self.learner.learn()
        self.train_seconds += time.perf_counter() - started

    def freeze_users(self, user_ids: list[str]) -> FrozenHistories:
        rows, weights = self.learner.user_histories(user_ids)
        # Item ids, not rows: joint scores them with a learner rebuilt since.
        ids = np.asarray(self.learner.catalogue.ids, dtype=object)
        return FrozenHistories(ids[rows] if len(ids) else np.zeros(rows.shape, object), weights)

    def scores(self, users: FrozenHistories, item_ids: list[str]) -> np.ndarray:
        rows = self.learner.catalogue.rows(users.item_ids.ravel()).reshape(users.item_ids.shape)
        vectors = self.learner.user_vectors_from(rows, users.weights)
        return vectors @ self.learner.item_vectors(item_ids).T


class FrozenHistories(NamedTuple):
    """Users' histories as they were: item ids and weights, [users, length] each."""

    item_ids: np.ndarray
    weights: np.ndarray


class JointRecommender:
    """The costly upper reference: retrained from the pretrained model on all events so far."""

    name = "joint"

    def __init__(self, make: Callable[[], LearnerRecommender], epochs: int) -> None:
        self._make = make
        self._epochs = epochs
        self._items: list[Item] = []
        self._events: list[Event] = []
        self._current: Optional[LearnerRecommender] = None
        self.samples_trained = 0
        self.train_seconds = 0.0

    def add_items(self, items: list[Item]) -> None:
        self._items = list(items)

    def learn(self, events: list[Event]) -> None:
        self._events.extend(events)
        fresh = self._make()
        fresh.add_items(self._items)
        for event in self._events:
            fresh.learner.observe(event)
        # Joint sees every event at once: one big experience, several epochs.
        fresh.learner.parts.strategy.train_epochs = self._epochs
        started = time.perf_counter()
        fresh.learner.learn()
        self.train_seconds += time.perf_counter() - started
        self.samples_trained += fresh.samples_trained
        self._current = fresh

    def freeze_users(self, user_ids: list[str]) -> FrozenHistories:
        if self._current is None:  # nothing learned yet: no history
            return FrozenHistories(np.zeros((len(user_ids), 0), object), np.zeros((len(user_ids), 0), np.float32))
        return self._current.freeze_users(user_ids)

    def scores(self, users: FrozenHistories, item_ids: list[str]) -> np.ndarray:
        if self._current is None:
            return np.zeros((len(users.weights), len(item_ids)))
        return self._current.scores(users, item_ids)


class FrozenTextRecommender:
    """The pretrained encoder as shipped: item = mean-pooled text vector, user =
    event-weighted sum of history item vectors (BASELINES.md's frozen peer)."""

    name = "frozen"

    def __init__(self, encoder: TextEncoder) -> None:
        self._encoder = encoder
        self._vectors: dict[str, np.ndarray] = {}
        self._profiles: dict[str, np.ndarray] = {}
        self.samples_trained = 0
        self.train_seconds = 0.0

    def add_items(self, items: list[Item]) -> None:
        pooled = self._encoder.pooled([encoder_text(item) for item in items])
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        for item, vec in zip(items, pooled / np.maximum(norms, 1e-12)):
            self._vectors[item.item_id] = vec.astype(np.float32)
        self._dim = pooled.shape[1]

    def _vec(self, item_id: str) -> np.ndarray:
        return self._vectors.get(item_id, np.zeros(self._dim, np.float32))

    def learn(self, events: list[Event]) -> None:
        for e in events:
            profile = self._profiles.setdefault(e.user_id, np.zeros(self._dim, np.float32))
            profile += EVENT_WEIGHTS[e.event_type] * self._vec(e.item_id)

    def freeze_users(self, user_ids: list[str]) -> np.ndarray:
        return np.stack([self._profiles.get(u, np.zeros(self._dim, np.float32)) for u in user_ids])

    def scores(self, users: np.ndarray, item_ids: list[str]) -> np.ndarray:
        items = np.stack([self._vec(i) for i in item_ids])
        return users @ items.T


def make_factory(config: LearnerConfig, experience_size: int = 512, joint_epochs: int = 2,
                 joint_batch_size: int = 512) -> Callable[[str], object]:
    """``factory(name) -> Recommender`` sharing one encoder and frozen cache across strategies.

    ``joint`` retrains on everything so far at every block, offline, the way a full
    retrain would: with larger minibatches (``joint_batch_size``), which cost less per
    sample; its sample count does not depend on them.
    """
    joint_config = dataclasses.replace(config, batch_size=joint_batch_size)
    shared: dict = {}
    # Every strategy reads the same stream, so the item-item head's fits are the same for all.
    fits = SharedFits()

    def encoder() -> TextEncoder:
        if "encoder" not in shared:
            shared["encoder"] = TextEncoder.from_config(config, resolve_device(config.device))
            shared["cache"] = {}
        return shared["encoder"]

    def factory(name: str):
        if name == "popularity":
            return PopularityRecommender()
        if name in PEERS:
            return PEERS[name]()
        if name == "frozen":
            return FrozenTextRecommender(encoder())
        if name in LEARNER_STRATEGIES:
            return LearnerRecommender(name, config, encoder(), shared["cache"], experience_size, fits)
        if name == "joint":
            return JointRecommender(
                lambda: LearnerRecommender("naive", joint_config, encoder(), shared["cache"], experience_size, fits),
                joint_epochs)
        raise KeyError(f"unknown strategy {name!r}; choose from {', '.join(ALL_STRATEGIES)}")

    return factory
