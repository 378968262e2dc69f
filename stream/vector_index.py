"""A small read side for downstream rankers: follow the ``vectors`` topic, answer top-k.

``VectorIndex`` keeps the newest vector per entity key (``user:<id>`` /
``item:<id>``) from the vector records (docs/formats.md) and ranks items for a
user by inner product (the vectors are L2-normalised, so this is cosine).

It reads the topic without a consumer group: every partition is assigned and
read from the beginning, so each ranker replica holds the whole (compacted)
topic and nothing is committed::

    consumer = open_consumer("kafka:9092", topic="vectors")
    index = VectorIndex()
    index.catch_up(consumer, timeout_s=60)        # read to the current end
    index.topk("42", k=10, exclude={"1193"})       # leaves out these and the items the user has
    index.topk("42", k=10, include_seen=True)      # known items kept
    index.topk("42", k=10, diversity=0.3)          # re-ranked for variety (stream/ranking.py)
    index.explain("42", ["1193"])                  # the history item each pick is closest to
    threading.Thread(target=index.follow, args=(consumer, stop), daemon=True).start()

``apply`` is pure (bytes in, state changed) so the logic is testable without
Kafka. Reads and writes are guarded by one lock, so ``follow`` can run in a
background thread while request threads call ``topk``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from stream import ranking

try:  # faiss is a dependency of the project, but the index works without it
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is missing
    faiss = None

log = logging.getLogger(__name__)

_KINDS = ("user", "item")
# The worker sends at most 1000 (--recent-items); a longer list from elsewhere is cut, not trusted whole.
MAX_RECENT = 1000


@dataclass(frozen=True)
class _Entry:
    vector: np.ndarray  # float32, shape (dim,)
    model_version: int
    updated_at: float
    because: tuple[str, ...] = ()  # a user's heaviest history items (payload "because"), heaviest first
    recent: tuple[str, ...] = ()  # a user's newest distinct history items (payload "recent_items")

    @property
    def seen(self) -> frozenset[str]:
        """The items this user is known to have: those published as ``because`` or ``recent_items``."""
        return frozenset(self.because).union(self.recent)


def _because(payload: dict) -> tuple[str, ...]:
    """The item ids of the optional ``because`` field; a malformed one counts as absent."""
    listed = payload.get("because")
    if not isinstance(listed, list):
        return ()
    return tuple(entry["item_id"] for entry in listed
                 if isinstance(entry, dict) and isinstance(entry.get("item_id"), str))


def _recent(payload: dict) -> tuple[str, ...]:
    """The item ids of the optional ``recent_items`` field (strings only, at most ``MAX_RECENT``);
    a malformed one counts as absent."""
    listed = payload.get("recent_items")
    if not isinstance(listed, list):
        return ()
    return tuple(item for item in listed[:MAX_RECENT] if isinstance(item, str))


def _parse(value: Union[bytes, str]) -> tuple[str, str, _Entry]:
    """(entity_type, entity_id, entry) from one vector record; ValueError when malformed."""
    obj = json.loads(value)
    if not isinstance(obj, dict):
        raise ValueError("record is not a JSON object")
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise ValueError("payload missing")
    kind = payload.get("entity_type")
    entity_id = payload.get("entity_id")
    if kind not in _KINDS:
        raise ValueError(f"unknown entity_type {kind!r}")
    if not isinstance(entity_id, str) or not entity_id:
        raise ValueError("entity_id missing")
    version = payload.get("model_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError("model_version is not an integer")
    updated_at = payload.get("updated_at", 0.0)
    if isinstance(updated_at, bool) or not isinstance(updated_at, (int, float)) or not math.isfinite(updated_at):
        raise ValueError("updated_at is not a finite number")
    raw = obj.get("vector")
    if not isinstance(raw, list) or not raw:
        raise ValueError("vector missing")
    vector = np.asarray(raw, dtype=np.float32)
    if vector.ndim != 1 or not np.all(np.isfinite(vector)):
        raise ValueError("vector is not a flat list of finite numbers")
    return kind, entity_id, _Entry(vector, version, float(updated_at), _because(payload), _recent(payload))


class VectorIndex:
    """Newest user and item vectors from the vectors topic, with inner-product top-k."""

    def __init__(self, use_faiss: Optional[bool] = None) -> None:
        self._use_faiss = (faiss is not None) if use_faiss is None else (use_faiss and faiss is not None)
        self._lock = threading.RLock()
        self._entries: dict[str, dict[str, _Entry]] = {kind: {} for kind in _KINDS}
        # item search structure per vector size, rebuilt lazily after item changes
        self._search: dict[int, tuple[object, list[str]]] = {}
        self.rejected = 0  # malformed records skipped

    # ------------------------------------------------------------------ input
    def apply(self, value: Optional[Union[bytes, str]], key: Optional[Union[bytes, str]] = None) -> bool:
        """Apply one record; True when it changed the index.

        The newer ``model_version`` wins; on the same version the newer
        ``updated_at`` wins; anything older or equal is ignored, so replaying
        the topic is harmless. A tombstone (``value`` None, ``key`` given)
        removes the entity. Malformed records are counted and skipped.
        """
        if value is None:
            return self._delete(key)
        try:
            kind, entity_id, entry = _parse(value)
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            self.rejected += 1
            log.debug("skipping malformed vector record: %s", exc)
            return False
        with self._lock:
            table = self._entries[kind]
            current = table.get(entity_id)
            if current is not None and (entry.model_version, entry.updated_at) <= (
                    current.model_version, current.updated_at):
                return False
            table[entity_id] = entry
            if kind == "item":
                self._search.clear()
            return True

    def _delete(self, key: Optional[Union[bytes, str]]) -> bool:
        if key is None:
            return False
        text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        kind, _, entity_id = text.partition(":")
        with self._lock:
            if kind not in self._entries or self._entries[kind].pop(entity_id, None) is None:
                return False
            if kind == "item":
                self._search.clear()
            return True

    def apply_records(self, records: Iterable) -> int:
        """Apply kafka-python ``ConsumerRecord``s (anything with ``.key`` and ``.value``)."""
        return sum(1 for record in records if self.apply(record.value, record.key))

    # ------------------------------------------------------------------ Kafka
    def poll(self, consumer, timeout_ms: int = 1000) -> int:
        """One ``consumer.poll``; returns how many records changed the index."""
        changed = 0
        for records in consumer.poll(timeout_ms=timeout_ms).values():
            changed += self.apply_records(records)
        return changed

    def catch_up(self, consumer, timeout_s: float = 60.0) -> bool:
        """Read until every assigned partition reaches the end offset it had on entry.

        Returns True when caught up, False when ``timeout_s`` ran out first.
        """
        deadline = time.monotonic() + timeout_s
        partitions = list(consumer.assignment())
        if not partitions:
            return True
        end = consumer.end_offsets(partitions)
        while True:
            behind = [tp for tp in partitions if consumer.position(tp) < end[tp]]
            if not behind:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("vector index not caught up after %.0fs: %d partition(s) behind",
                            timeout_s, len(behind))
                return False
            self.poll(consumer, timeout_ms=int(min(left, 1.0) * 1000) or 1)

    def follow(self, consumer, stop: threading.Event, timeout_ms: int = 1000) -> None:
        """Keep polling until ``stop`` is set (run it in a background thread)."""
        while not stop.is_set():
            self.poll(consumer, timeout_ms=timeout_ms)

    # ------------------------------------------------------------------ queries
    def user_vector(self, user_id: str) -> Optional[np.ndarray]:
        with self._lock:
            entry = self._entries["user"].get(user_id)
            return None if entry is None else entry.vector.copy()

    def item_vector(self, item_id: str) -> Optional[np.ndarray]:
        with self._lock:
            entry = self._entries["item"].get(item_id)
            return None if entry is None else entry.vector.copy()

    def model_version(self, kind: str, entity_id: str) -> Optional[int]:
        with self._lock:
            entry = self._entries[kind].get(entity_id)
            return None if entry is None else entry.model_version

    def item_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries["item"])

    def user_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries["user"])

    def seen_items(self, user_id: str) -> frozenset[str]:
        """The items the user is known to have (published with their vector); empty when unknown."""
        with self._lock:
            entry = self._entries["user"].get(user_id)
            return frozenset() if entry is None else entry.seen

    def topk(self, user_id: str, k: int = 10, exclude: Iterable[str] = (),
             diversity: float = 0.0, include_seen: bool = False) -> list[tuple[str, float]]:
        """The k items with the largest dot(user, item), best first, skipping ``exclude`` and,
        unless ``include_seen``, the items the user is known to have (``seen_items``): a ranker
        wants what the user has not got yet.

        ``diversity`` L in (0, 1]: the k picks are re-ranked from the best few
        times k by maximal marginal relevance (stream/ranking.py), each still
        with its dot(user, item); 0 is the plain ranking. An unknown user (no
        vector published yet) gets an empty list: the caller falls back to its
        cold-start ranking.
        """
        if k <= 0:
            return []
        if not include_seen:
            exclude = self.seen_items(user_id).union(exclude)
        if diversity:
            with self._lock:
                candidates = self._ranked(user_id, ranking.pool_size(k, diversity), exclude)
                vectors = self._item_matrix([item for item, _ in candidates])
            picks = ranking.mmr(np.array([score for _, score in candidates]), vectors, k, diversity)
            return [candidates[i] for i in picks]
        return self._ranked(user_id, k, exclude)

    def _ranked(self, user_id: str, k: int, exclude: Iterable[str]) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        with self._lock:
            user = self._entries["user"].get(user_id)
            if user is None:
                return []
            index, ids = self._search_for(user.vector.shape[0])
            if not ids:
                return []
            excluded = set(exclude)
            wanted = min(len(ids), k + sum(1 for item in excluded if item in self._entries["item"]))
            query = user.vector.reshape(1, -1)
            if isinstance(index, np.ndarray):
                scores = index @ user.vector
                order = np.argsort(-scores, kind="stable")[:wanted]
                hits = [(int(i), float(scores[i])) for i in order]
            else:
                distances, rows = index.search(query, wanted)
                hits = [(int(i), float(d)) for i, d in zip(rows[0], distances[0]) if i >= 0]
        out = []
        for row, score in hits:
            if ids[row] in excluded:
                continue
            out.append((ids[row], score))
            if len(out) == k:
                break
        return out

    def _item_matrix(self, item_ids: Sequence[str]) -> np.ndarray:
        """The vectors of these items, one row each (the caller holds the lock)."""
        table = self._entries["item"]
        if not item_ids:
            return np.zeros((0, 1), np.float32)
        return np.stack([table[item].vector for item in item_ids])

    def intra_list_similarity(self, item_ids: Sequence[str]) -> float:
        """Mean pairwise cosine of these items' vectors (those the index holds); 0.0 for fewer than two."""
        with self._lock:
            known = [item for item in item_ids if item in self._entries["item"]]
            return ranking.intra_list_similarity(self._item_matrix(known))

    def explain(self, user_id: str, item_ids: Sequence[str]) -> list[Optional[tuple[str, float]]]:
        """For each item, the item of the user's ``because`` list (their heaviest history items, as
        published) whose vector is closest to it, and that cosine; None where there is none to
        compare (no list published, or none of its items, or not the item itself, in the index)."""
        with self._lock:
            user = self._entries["user"].get(user_id)
            items = self._entries["item"]
            history = [item for item in (user.because if user else ()) if item in items]
            out: list[Optional[tuple[str, float]]] = []
            if not history:
                return [None] * len(item_ids)
            reasons = ranking.unit_rows(self._item_matrix(history))
            for item in item_ids:
                entry = items.get(item)
                if entry is None or entry.vector.shape[0] != reasons.shape[1]:
                    out.append(None)
                    continue
                sims = reasons @ ranking.unit_rows(entry.vector[None, :])[0]
                best = int(np.argmax(sims))
                out.append((history[best], float(sims[best])))
            return out

    def _search_for(self, dim: int) -> tuple[object, Sequence[str]]:
        """Items of size ``dim`` as a faiss IndexFlatIP (or a numpy matrix), cached."""
        cached = self._search.get(dim)
        if cached is not None:
            return cached
        ids = sorted(item for item, e in self._entries["item"].items() if e.vector.shape[0] == dim)
        matrix = np.stack([self._entries["item"][i].vector for i in ids]) if ids else np.zeros((0, dim), np.float32)
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        if self._use_faiss:
            index = faiss.IndexFlatIP(dim)
            if ids:
                index.add(matrix)
        else:
            index = matrix
        self._search[dim] = (index, ids)
        return index, ids

    def __len__(self) -> int:
        with self._lock:
            return sum(len(table) for table in self._entries.values())


def open_consumer(bootstrap_servers: Union[str, Sequence[str]], topic: str = "vectors",
                  timeout_s: float = 30.0, **kafka_kwargs):
    """A group-less ``KafkaConsumer`` assigned to every partition of ``topic``, at the beginning.

    ``timeout_s`` bounds the whole wait, connecting included: an unreachable
    cluster raises ``BrokerError`` once it runs out. Extra keyword arguments
    (security settings, client_id, ...) go to ``kafka.KafkaConsumer``.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    from stream.kafka.errors import BrokerError

    if isinstance(bootstrap_servers, str):
        bootstrap_servers = bootstrap_servers.split(",")
    kafka_kwargs.setdefault("client_id", "recstream-vector-index")
    # kafka-python connects inside the constructor with its own 30 s bootstrap timeout
    kafka_kwargs.setdefault("bootstrap_timeout_ms", max(1, int(timeout_s * 1000)))
    deadline = time.monotonic() + timeout_s
    try:
        consumer = KafkaConsumer(bootstrap_servers=list(bootstrap_servers), group_id=None,
                                 enable_auto_commit=False, **kafka_kwargs)
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {','.join(bootstrap_servers)} within {timeout_s:g}s "
                          f"({type(exc).__name__}); check --bootstrap-servers and that the cluster is up") from None
    partitions = consumer.partitions_for_topic(topic)
    while not partitions:
        if time.monotonic() > deadline:
            consumer.close()
            raise TimeoutError(f"topic {topic!r} has no partitions after {timeout_s:.0f}s")
        time.sleep(0.2)
        partitions = consumer.partitions_for_topic(topic)
    assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(assigned)
    consumer.seek_to_beginning(*assigned)
    return consumer
