"""The partition-state changelog: each user's history, kept beside the events partition it came from.

A compacted topic (``--changelog-topic``) with at least as many partitions as
the events topic, co-partitioned with it: a user's record goes to the
changelog partition of the same number as the events partition their events
arrive on (key = user id, as the events are keyed). At every checkpoint, before
its offsets are committed, a worker writes the history of each user whose
events it applied since the last one; the value names the offset of the events
partition that history holds events up to (``through``). A worker assigned an
events partition whose state it does not hold reads that changelog partition
and takes, per user, the newest history holding nothing at or past the offset
it starts reading from (``choose``): what the previous owner had at its commit.
An erased user gets a tombstone (no value) in every partition.

Value: UTF-8 JSON ``{"v": 1, "through": 1234, "items": ["i1", ...], "weights": [1.0, ...]}``,
items and event weights oldest first. Each partition also holds one record under
``LEDGER_KEY``: the newest event ids applied from it, as the de-duplication
ledger's hashes (``{"v": 1, "through": 1234, "ledger": "<base64 of little-endian int64>"}``),
so a repeat delivery that straddles the handover is still recognised.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from stream.kafka.errors import BrokerError

log = logging.getLogger(__name__)

FORMAT = 1
LEDGER_KEY = b"\x00recstream-ledger"  # a NUL byte: no user id a producer keys events by


@dataclass(frozen=True)
class UserState:
    """One changelog record: a user's history as of ``through`` on their events partition."""
    user_id: str
    through: int
    items: tuple[str, ...]
    weights: tuple[float, ...]


def encode_user_state(through: int, items: list[str], weights: list[float]) -> bytes:
    return orjson.dumps({"v": FORMAT, "through": int(through), "items": items, "weights": weights})


def encode_ledger(through: int, hashes: np.ndarray) -> bytes:
    packed = base64.b64encode(np.asarray(hashes, dtype="<i8").tobytes()).decode("ascii")
    return orjson.dumps({"v": FORMAT, "through": int(through), "ledger": packed})


def decode_ledger(value: Optional[bytes]) -> Optional[tuple[int, np.ndarray]]:
    """(through, hashes) of a ledger record; None for anything else."""
    try:
        data = orjson.loads(value)
        if data.get("v") != FORMAT:
            return None
        return int(data["through"]), np.frombuffer(base64.b64decode(data["ledger"]), dtype="<i8").astype(np.int64)
    except (AttributeError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def decode_user_state(key: Optional[bytes], value: Optional[bytes]) -> Optional[UserState]:
    """The record's state; None for anything not written by this format (logged by the caller)."""
    try:
        user_id = key.decode("utf-8")
        data = orjson.loads(value)
        items, weights = data["items"], data["weights"]
        if data.get("v") != FORMAT or len(items) != len(weights) \
                or not all(isinstance(i, str) for i in items):
            return None
        return UserState(user_id, int(data["through"]), tuple(items), tuple(float(w) for w in weights))
    except (AttributeError, UnicodeDecodeError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


@dataclass
class Chosen:
    """What ``choose`` found in one changelog partition."""
    users: dict[str, UserState]
    ledger: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # event id hashes
    ahead: int = 0  # users with states past the start only: left out (see ``choose``)
    unreadable: int = 0


def choose(records: Iterable[tuple[Optional[bytes], Optional[bytes]]], start: int) -> Chosen:
    """Per user, the newest state holding nothing at or past ``start`` (records in log order),
    and likewise the partition's newest ledger record.

    A tombstone forgets what came before it. States past ``start`` were written
    by a worker that died before committing them: the records behind them are
    read again, so taking them would hold those events twice. A user with no
    other state is left out (counted in ``ahead``): either they are new since
    ``start``, and the records read again rebuild them, or compaction already
    removed their older state.
    """
    exact: dict[str, UserState] = {}
    past: set[str] = set()
    ledger = np.zeros(0, np.int64)
    unreadable = 0
    for key, value in records:
        if key is None:
            unreadable += 1
            continue
        if key == LEDGER_KEY:
            decoded = decode_ledger(value)
            if decoded is None:
                unreadable += 1
            elif decoded[0] <= start:
                ledger = decoded[1]
            continue
        if value is None:
            user_id = key.decode("utf-8", "replace")
            exact.pop(user_id, None)
            past.discard(user_id)
            continue
        state = decode_user_state(key, value)
        if state is None:
            unreadable += 1
        elif state.through <= start:
            exact[state.user_id] = state
        else:
            past.add(state.user_id)
    return Chosen(exact, ledger, len(past - exact.keys()), unreadable)


def read_partition(consumer: KafkaConsumer, topic: str, partition: int, timeout_s: float = 60.0) \
        -> list[tuple[Optional[bytes], Optional[bytes]]]:
    """Every record of one changelog partition, from its beginning to its end as of now.

    Read until the position has passed the listed end offset and a poll finds
    nothing more: some Kafka-compatible brokers list a smaller end than they hold."""
    tp = TopicPartition(topic, partition)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        out: list[tuple[Optional[bytes], Optional[bytes]]] = []
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise BrokerError(f"reading {topic}[{partition}] did not reach its end ({end}) in {timeout_s:.0f}s")
            batches = consumer.poll(timeout_ms=200)
            for batch in batches.values():
                out.extend((record.key, record.value) for record in batch)
            if not batches and consumer.position(tp) >= end:
                return out
    except KafkaError as exc:
        raise BrokerError(f"could not read {topic}[{partition}]: {exc}") from exc
