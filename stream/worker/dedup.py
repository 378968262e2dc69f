"""Bounded memory of seen event ids: a repeated delivery changes nothing.

Policy
------
The ledger remembers exactly the newest ``capacity`` event ids it accepted
(a size window; the oldest are forgotten first). A duplicate arriving after
more than ``capacity`` newer events is no longer recognised, so size the
window above the redelivery horizon you expect: a crash or a rebalance
replays at most what came after the last checkpoint (one
``--checkpoint-interval-s`` of events), and producer retries repeat an event
within seconds. The default, 2,000,000 ids, covers 33 minutes at 1,000
events/s.

Storage
-------
Ids are kept as 64-bit hashes (``hash_ids``: of the UTF-8 id, vectorised
per batch, stable across processes and machines), never as strings: 16 bytes per remembered id
(hash + its sequence number), in fixed-size numpy generations. Two distinct
ids collide with probability about ``capacity / 2**64`` per event (1e-13 at
the default window): such an event would be taken for a duplicate.

* the newest generation is a dict ``hash -> sequence number`` of at most
  ``generation`` entries (plus one poll's batch);
* when it is full it is sealed into two numpy arrays sorted by hash, looked
  up with ``searchsorted`` for a whole batch of ids at once;
* a sealed generation whose newest id left the window is dropped; a hit in
  one whose older ids left it counts only if that id's own sequence number
  is still inside the window, so the window is exact.

Memory is therefore at most ``16 * capacity`` bytes of arrays plus one
generation's dict, and a checkpoint stores the window as one base64 string
of ``8 * len`` bytes (``state()``), serialised in milliseconds.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Iterable, Sequence, Union

import numpy as np

log = logging.getLogger("stream.worker")

STATE_FORMAT = "hash64-v2"  # hash_ids below; a new hash needs a new name
# Windows saved with an earlier hash_ids, whose hashes cannot be recomputed: a restore starts empty.
_OLD_FORMATS = ("hash64-v1",)
_GENERATIONS = 16  # the newest generation, a dict, holds at most 1/16 of the window
_MAX_GENERATION = 1 << 17


_WORDS = 8  # ids up to 64 UTF-8 bytes are hashed vectorised; longer ones one by one (BLAKE2b)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xFF51AFD7ED558CCD)
_M3 = np.uint64(0xC4CEB9FE1A85EC53)


def hash_ids(event_ids: Sequence[str]) -> np.ndarray:
    """Stable 64-bit hashes (int64) of ``event_ids``; the same on every process and machine.

    Ids are read as little-endian 64-bit words of their UTF-8 bytes, folded with a
    multiply-xorshift and finished with MurmurHash3's fmix64, the length mixed into
    the seed; for a whole batch at once in numpy (a few numpy operations per 8 bytes
    of the longest id). Each id folds its own words only, so its hash does not depend
    on the other ids of the batch. Ids over 64 bytes use BLAKE2b instead. Checkpoints
    store these values: changing this function forgets every saved window.
    """
    encoded = [e.encode("utf-8", "surrogatepass") for e in event_ids]
    n = len(encoded)
    lengths = np.fromiter(map(len, encoded), np.int64, n)
    out = np.empty(n, np.int64)
    long = lengths > 8 * _WORDS
    if long.any():
        for i in np.flatnonzero(long).tolist():
            out[i] = int.from_bytes(hashlib.blake2b(encoded[i], digest_size=8).digest(), "little", signed=True)
        short = np.flatnonzero(~long)
        encoded = [encoded[i] for i in short.tolist()]
        lengths = lengths[short]
    else:
        short = None
    if encoded:
        width = max(8, -(-int(lengths.max()) // 8) * 8)
        words = np.array(encoded, dtype=f"S{width}").view("<u8").reshape(len(encoded), width // 8)
        h = lengths.astype(np.uint64) * _M2 + _M1
        own_words = np.maximum(1, -(-lengths // 8))  # the zero padding after an id is not part of it
        for column in range(words.shape[1]):
            folded = (h ^ words[:, column]) * _M1
            folded ^= folded >> np.uint64(29)
            h = np.where(column < own_words, folded, h)
        h ^= h >> np.uint64(33)
        h *= _M2
        h ^= h >> np.uint64(33)
        h *= _M3
        h ^= h >> np.uint64(33)
        if short is None:
            out[:] = h.view(np.int64)
        else:
            out[short] = h.view(np.int64)
    return out


def event_hash(event_id: str) -> int:
    """The stable 64-bit hash the ledger keeps for ``event_id`` (see ``hash_ids``)."""
    return int(hash_ids([event_id])[0])


class EventLedger:
    def __init__(self, capacity: int, generation: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"the de-duplication window must hold at least one id (got {capacity})")
        self.capacity = int(capacity)
        self.generation = int(generation) or max(1, min(_MAX_GENERATION, -(-self.capacity // _GENERATIONS)))
        self._count = 0  # ids accepted so far; the next one gets this sequence number
        self._current: dict[int, int] = {}  # newest ids: hash -> sequence number
        # Older ids of the window: hashes sorted, and each one's sequence number. Replaced
        # (never changed in place) when the newest generation is sealed into them.
        self._hashes = np.zeros(0, np.int64)
        self._seqs = np.zeros(0, np.int64)

    def __len__(self) -> int:
        """Ids remembered now (at most ``capacity``)."""
        return min(self._count, self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes of the sealed arrays (the newest generation's dict not included)."""
        return self._hashes.nbytes + self._seqs.nbytes

    # -- adding ------------------------------------------------------------------
    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; False when it is already in the window (a duplicate)."""
        return bool(self.add_many([event_id])[0])

    def add_many(self, event_ids: Sequence[str]) -> list[bool]:
        """Remember ``event_ids`` in order; True for each one seen for the first time.

        A repeat inside the same call is a duplicate too. One vectorised hash and
        one ``searchsorted`` for the whole batch, then a dict lookup per id.
        """
        return self.add_hashes(hash_ids(event_ids)) if len(event_ids) else []

    def add_hashes(self, array: np.ndarray) -> list[bool]:
        """``add_many`` for ids already hashed (``hash_ids``)."""
        older = self._lookup(array)
        current, capacity = self._current, self.capacity
        fresh = []
        count = self._count
        for h, old in zip(array.tolist(), older.tolist()):
            seq = current.get(h, old)
            if seq >= 0 and seq >= count - capacity:
                fresh.append(False)
                continue
            current[h] = count
            count += 1
            fresh.append(True)
        self._count = count
        if len(current) >= self.generation:
            self._seal()
        return fresh

    def _lookup(self, array: np.ndarray) -> np.ndarray:
        """Sequence number of each hash among the sealed ids, -1 where absent."""
        hashes = self._hashes
        if not len(hashes):
            return np.full(len(array), -1, np.int64)
        at = np.empty(len(array), np.int64)
        order = np.argsort(array)
        at[order] = np.searchsorted(hashes, array[order])  # sorted needles: cache-friendly
        at[at == len(hashes)] = 0
        return np.where(hashes[at] == array, self._seqs[at], -1)

    def _seal(self) -> None:
        """Merge the newest generation into the sorted arrays, dropping ids that left the window."""
        current, self._current = self._current, {}
        new_hashes = np.fromiter(current.keys(), np.int64, len(current))
        new_seqs = np.fromiter(current.values(), np.int64, len(current))
        oldest_kept = self._count - self.capacity
        keep = new_seqs >= oldest_kept
        order = np.argsort(new_hashes[keep])
        new_hashes, new_seqs = new_hashes[keep][order], new_seqs[keep][order]
        keep = self._seqs >= oldest_kept
        hashes, seqs = (self._hashes, self._seqs) if keep.all() else (self._hashes[keep], self._seqs[keep])
        at = np.searchsorted(hashes, new_hashes)  # merge two sorted runs: O(window), no sort of it
        self._hashes, self._seqs = np.insert(hashes, at, new_hashes), np.insert(seqs, at, new_seqs)

    # -- checkpoints ---------------------------------------------------------------
    def snapshot(self) -> "LedgerSnapshot":
        """The window as it is now, for a checkpoint written on another thread.

        Cheap: the sealed arrays are never changed in place (shared), the newest
        generation's dict is copied; ``LedgerSnapshot.state()`` encodes it later,
        off the loop.
        """
        return LedgerSnapshot(self.capacity, self._count, self._hashes, self._seqs, dict(self._current))

    def hashes(self) -> np.ndarray:
        """The hashes in the window, oldest first (int64)."""
        return self.snapshot().hashes()

    def state(self) -> dict:
        """JSON-ready window: ``{"format", "capacity", "hashes": base64 of little-endian int64}``."""
        return self.snapshot().state()

    @classmethod
    def from_state(cls, capacity: int, state: Union[dict, Iterable[str], None]) -> "EventLedger":
        """A ledger holding the newest ``capacity`` ids of ``state`` (``state()``'s dict, or the
        list of id strings older checkpoints stored)."""
        ledger = cls(capacity)
        if not state:
            return ledger
        if isinstance(state, dict):
            if state.get("format") in _OLD_FORMATS:
                log.warning("the checkpoint's de-duplication window was saved with an earlier id hash: starting "
                            "with an empty one (records below the checkpoint's offsets are still skipped; a "
                            "repeat delivery of an event applied before it is not recognised)")
                return ledger
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown de-duplication ledger format {state.get('format')!r}")
            hashes = np.frombuffer(base64.b64decode(state["hashes"]), dtype="<i8").astype(np.int64)
        else:
            hashes = hash_ids(list(state))
        hashes = hashes[-ledger.capacity:]
        # A saved window holds each hash once, oldest first.
        array = np.asarray(hashes, dtype=np.int64)
        seqs = np.arange(len(array), dtype=np.int64)
        order = np.argsort(array, kind="stable")
        # noqa: SLF001 below: fields of its own class, set once on the instance it builds.
        ledger._hashes, ledger._seqs, ledger._count = array[order], seqs[order], len(array)  # noqa: SLF001
        return ledger


class LedgerSnapshot:
    """An immutable copy of a ledger's window (see ``EventLedger.snapshot``)."""

    def __init__(self, capacity: int, count: int, hashes: np.ndarray, seqs: np.ndarray, current: dict) -> None:
        self.capacity, self.count = capacity, count
        self._hashes, self._seqs, self._current = hashes, seqs, current

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def hashes(self) -> np.ndarray:
        hashes = np.concatenate([self._hashes, np.fromiter(self._current.keys(), np.int64, len(self._current))])
        seqs = np.concatenate([self._seqs, np.fromiter(self._current.values(), np.int64, len(self._current))])
        window = seqs >= self.count - self.capacity  # inside it, every hash appears once
        hashes, seqs = hashes[window], seqs[window]
        return hashes[np.argsort(seqs, kind="stable")]

    def state(self) -> dict:
        return {"format": STATE_FORMAT, "capacity": self.capacity,
                "hashes": base64.b64encode(self.hashes().astype("<i8").tobytes()).decode("ascii")}
