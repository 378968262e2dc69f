"""What every bench section shares: the cluster, topics, the synthetic world,
fast producing, percentiles from fixed-size histograms and learners that
share one frozen-feature cache (so no section encodes the catalogue twice).
"""

from __future__ import annotations

import logging
import math
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from learners.records import Event, Item, event_to_json, item_to_json
from learners.synthetic import TOPICS
from stream.config import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

_ADJECTIVES = ("quiet", "epic", "dark", "joyful", "strange", "tender", "brutal", "witty", "lost", "golden")
_NOUNS = ("river", "city", "star", "garden", "machine", "winter", "kingdom", "detective", "song", "island")


@dataclass(frozen=True)
class BenchWorld:
    """Users, items and a deterministic event stream for the bench.

    Users come round-robin over a fixed shuffle, so each user's events are
    exactly ``n_users / rate`` seconds apart: the freshness reader can then
    match every event to the first vector of its user published after it
    without ambiguity (while latency stays below that period). Items follow
    the user's favourite topic with a few very popular items per topic, like
    ``learners.synthetic``. Only the first ``text_items`` items get a text
    (encoding 100,000 texts with MiniLM on a small CPU takes longer than the
    whole bench); the others exist from their first event on, id part only.
    """

    n_users: int
    n_items: int
    text_items: int
    seed: int = 0

    def items(self) -> list[Item]:
        rng = random.Random(self.seed)
        out = []
        for i in range(min(self.n_items, self.text_items)):
            title = f"The {rng.choice(_ADJECTIVES).title()} {rng.choice(_NOUNS).title()} {i}"
            out.append(Item(f"item-{i}", f"{title} ({1960 + rng.randrange(60)}) | {TOPICS[i % len(TOPICS)]}"))
        return out

    def user_order(self) -> np.ndarray:
        return np.random.default_rng(self.seed).permutation(self.n_users)

    def events(self, start: int, count: int, *, ts: Optional[Callable[[int], float]] = None,
               id_prefix: str = "b") -> Iterator[Event]:
        """Events ``start .. start + count - 1``; ``ts(k)`` gives event k's timestamp (default: now)."""
        order = self.user_order()
        rng = random.Random(self.seed * 7919 + start)
        n_topics = len(TOPICS)
        per_topic = max(1, self.n_items // n_topics)
        for k in range(start, start + count):
            user = int(order[k % self.n_users])
            topic = user % n_topics
            r = rng.random()
            if r < 0.15:
                item = rng.randrange(self.n_items)
            else:
                rank = min(int(rng.expovariate(1 / 8)), per_topic - 1) if r < 0.75 else rng.randrange(per_topic)
                item = min(topic + n_topics * rank, self.n_items - 1)
            kind = ("click", "click", "purchase", "click", "favourite", "click", "purchase", "click",
                    "click", "purchase")[k % 10]
            yield Event(f"{id_prefix}-{k}", f"user-{user}", f"item-{item}", kind,
                        ts(k) if ts is not None else time.time())


# -- cluster -------------------------------------------------------------------------

class Cluster:
    """The embedded broker, or the cluster given with --bootstrap-servers; unique topic names."""

    def __init__(self, bootstrap_servers: Optional[str], base: Settings) -> None:
        self._broker = None
        self.base = base
        self.run_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if bootstrap_servers:
            self.bootstrap = bootstrap_servers
            self.embedded = False
        else:
            from stream.kafka.broker import EmbeddedBroker

            self._broker = EmbeddedBroker().start()
            self.bootstrap = self._broker.bootstrap
            self.embedded = True
        self._created: list[str] = []
        self.settings = base.model_copy(update={"bootstrap_servers": self.bootstrap})

    def client_kwargs(self) -> dict:
        """Security settings for plain kafka-python clients (the same the worker uses)."""
        return self.settings._security_kwargs()  # noqa: SLF001 - same package family

    def topics(self, phase: str, partitions: int = 3) -> Settings:
        """Fresh events/items/vectors/dlq/forget topics and a fresh group for one phase."""
        from stream.kafka.broker import ensure_topics

        stem = f"recstream-bench-{self.run_id}-{phase}"
        names = {"events_topic": f"{stem}-events", "items_topic": f"{stem}-items",
                 "vectors_topic": f"{stem}-vectors", "dlq_topic": f"{stem}-dlq", "forget_topic": f"{stem}-forget",
                 "changelog_topic": f"{stem}-changelog"}
        ensure_topics(self.bootstrap, {names["events_topic"]: partitions, names["items_topic"]: 1,
                                       names["vectors_topic"]: partitions, names["dlq_topic"]: 1,
                                       names["forget_topic"]: 1, names["changelog_topic"]: partitions},
                      compacted={names["items_topic"], names["vectors_topic"], names["changelog_topic"]},
                      **self.client_kwargs())
        self._created.extend(names.values())
        return self.settings.model_copy(update={**names, "group_id": f"{stem}-{uuid.uuid4().hex[:6]}"})

    def close(self) -> None:
        if self._broker is not None:
            self._broker.stop()
            return
        if self._created:  # a real cluster: leave it as we found it (best effort)
            try:
                from kafka import KafkaAdminClient

                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap.split(","), **self.client_kwargs())
                try:
                    admin.delete_topics(self._created)
                finally:
                    admin.close()
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the results
                log.warning("could not delete the bench topics %s: %s", self._created, exc)


def produce(settings: Settings, topic: str, records: Sequence[tuple[bytes, bytes]], client_kwargs: dict) -> float:
    """Send (key, value) records as fast as kafka-python goes; returns seconds."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers.split(","), linger_ms=20,
                             batch_size=512 * 1024, acks=1, **client_kwargs)
    started = time.perf_counter()
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value)
        producer.flush()
    finally:
        producer.close()
    return time.perf_counter() - started


def event_records(world: BenchWorld, start: int, count: int, id_prefix: str) -> list[tuple[bytes, bytes]]:
    base = time.time()
    return [(e.user_id.encode(), event_to_json(e))
            for e in world.events(start, count, ts=lambda k: base + k * 1e-3, id_prefix=id_prefix)]


def item_records(items: Sequence[Item]) -> list[tuple[bytes, bytes]]:
    return [(item.item_id.encode(), item_to_json(item)) for item in items]


# -- learners sharing one frozen cache -----------------------------------------------------

class LearnerFactory:
    """Learners with the bench catalogue loaded; the frozen encoder features of a
    text are computed once per bench run and shared (``add_items(frozen_cache=)``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache: dict = {}
        self.encode_seconds = 0.0
        self.encoded_texts = 0

    def config(self, **overrides):
        import dataclasses

        from stream.learner_setup import learner_config

        return dataclasses.replace(learner_config(self.settings), **overrides) if overrides else \
            learner_config(self.settings)

    def make(self, items: Sequence[Item], **overrides):
        from learners.learner import ContinualRecommender

        learner = ContinualRecommender(self.config(**overrides))
        self.load(learner, items)
        return learner

    def load(self, learner, items: Sequence[Item]) -> None:
        before = len(self.cache)
        started = time.perf_counter()
        learner.add_items(list(items), frozen_cache=self.cache)
        if len(self.cache) > before:
            self.encode_seconds += time.perf_counter() - started
            self.encoded_texts += len(self.cache) - before


# -- statistics ------------------------------------------------------------------------------

@dataclass
class LatencyHistogram:
    """Fixed memory (1 ms buckets up to ``max_s``, then one overflow bucket), exact to 1 ms."""

    max_s: float = 300.0
    resolution_s: float = 1e-3
    counts: np.ndarray = field(init=False)
    n: int = 0
    total: float = 0.0
    largest: float = 0.0

    def __post_init__(self) -> None:
        self.counts = np.zeros(int(self.max_s / self.resolution_s) + 2, np.int64)

    def add(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        idx = min(int(seconds / self.resolution_s), len(self.counts) - 1)
        self.counts[idx] += 1
        self.n += 1
        self.total += seconds
        self.largest = max(self.largest, seconds)

    def quantile(self, q: float) -> Optional[float]:
        if not self.n:
            return None
        rank = max(1, math.ceil(q * self.n))
        idx = int(np.searchsorted(np.cumsum(self.counts), rank))
        if idx >= len(self.counts) - 1:
            return self.largest
        return (idx + 1) * self.resolution_s  # upper edge: never flatters

    def summary(self) -> dict:
        return {"n": self.n, "p50_s": _round(self.quantile(0.50)), "p90_s": _round(self.quantile(0.90)),
                "p99_s": _round(self.quantile(0.99)), "max_s": _round(self.largest if self.n else None),
                "mean_s": _round(self.total / self.n if self.n else None)}


def _round(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else round(float(value), digits)


def median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 4)


_STATE_DIRS: list[str] = []


def temp_state_dir(tag: str) -> str:
    """A fresh checkpoint folder; ``remove_state_dirs`` deletes them all (each can hold GBs)."""
    path = tempfile.mkdtemp(prefix=f"recstream-bench-{tag}-")
    _STATE_DIRS.append(path)
    return path


def remove_state_dirs() -> None:
    import shutil

    while _STATE_DIRS:
        shutil.rmtree(_STATE_DIRS.pop(), ignore_errors=True)
