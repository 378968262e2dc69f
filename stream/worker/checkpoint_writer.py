"""Checkpoints written off the worker's loop, and off its training.

A checkpoint comes in three steps:

1. The *snapshot*, on the loop thread, in one go between two batches: the
   worker's bookkeeping (offsets, totals, dead-letter positions, the
   de-duplication window) and a ``LearnerSnapshot`` holding copies of
   everything of the learner that the loop changes while events arrive (user
   histories, catalogue ids, pending samples, counters). Milliseconds.
2. The *prepare* (``CheckpointStore.prepare``: the learner's state to bytes in
   memory, the encoder exported to a temporary folder), on the thread that
   trains, so the model, the optimizer, EWC and the replay buffer -- which only
   training changes -- stand still meanwhile (its cost and the write's:
   docs/performance.md). Until it
   ends the learner is marked ``training_in_flight``, as during an experience:
   the loop keeps publishing user vectors from the last vector tables and does
   not grow the model or encode new item texts.
3. The *write* (``CheckpointStore.write``: files, fsync, sha256, the commit,
   pruning) on a thread of its own, which reads nothing of the learner:
   experiences train meanwhile. Writes run one at a time, in order.

The worker commits a checkpoint's offsets only after ``CheckpointJob.result()``
reports it durable (stream/worker/checkpointer.py), so the exactly-once
guarantees are those of a checkpoint written on the loop.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from learners.checkpoint import CheckpointStore, PreparedCheckpoint
from learners.state.stream_state import StreamState
from stream.worker import heap
from stream.worker.dedup import LedgerSnapshot


class _Frozen:
    """Stands in for a learner part whose ``state()`` was taken at snapshot time."""

    def __init__(self, state: dict, length: int) -> None:
        self._state, self._length = state, length

    def state(self) -> dict:
        return self._state

    def __len__(self) -> int:
        return self._length


def _copy_state(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            out[key] = value.copy()
        elif isinstance(value, (list, dict)):
            out[key] = type(value)(value)
        else:
            out[key] = value
    return out


class LearnerSnapshot:
    """A learner as ``CheckpointStore.save`` reads it, frozen at one moment.

    What the loop thread changes between experiences is copied here; the rest
    (model, optimizer, EWC, replay buffer, item features, encoder) is read from
    the live learner, which stays still while the prepare runs on the training
    thread (see the module docstring).
    """

    def __init__(self, learner) -> None:
        self._live = learner
        self.users = _Frozen(_copy_state(learner.users.state()), len(learner.users))
        self.catalogue = _Frozen(_copy_state(learner.catalogue.state()), len(learner.catalogue))
        self._stream = learner.snapshot()
        self.model_version = self._stream.model_version

    def snapshot(self) -> StreamState:
        """The learner's stream state as of this snapshot (no copy: it is a copy already)."""
        return self._stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live, name)


@dataclass
class CheckpointJob:
    """One checkpoint: what it covers, and its prepare and write in flight."""
    offsets: dict                 # event offsets it holds, per (topic, partition): committed once durable
    extra: dict                   # the worker's bookkeeping, the ledger added when written
    snapshot_s: float             # loop time spent taking the snapshot
    started: float = field(default_factory=time.monotonic)
    changelog: Any = None               # the partition state it sends (stream/worker/handover.py)
    peer_wait_s: float = 0.0            # how long its write waits for the peer store's of its version
    prepared: Optional[Future] = None   # -> PreparedCheckpoint, once the learner is free again
    future: Optional[Future] = None     # -> the checkpoint folder, once durable
    path: Optional[Path] = None
    write_s: float = 0.0

    def holds_learner(self) -> bool:
        """True until the prepare has ended: the model must stay as it is."""
        return self.prepared is not None and not self.prepared.done()

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def result(self) -> Path:
        """The checkpoint folder once durable; raises what the prepare or the write raised."""
        if self.future is not None:
            self.path = self.future.result()
        return self.path


class CheckpointWriter:
    """Takes snapshots on the loop, prepares them on ``prepare_on``'s thread (the one that trains)
    and writes them with ``store`` on ``write_on``'s (one thread: writes stay in order)."""

    def __init__(self, store: CheckpointStore, learner, prepare_on: Executor, write_on: Executor) -> None:
        self.store = store
        self.learner = learner
        self.prepare_on = prepare_on
        self.write_on = write_on

    def start(self, offsets: dict, extra: dict, ledger: LedgerSnapshot,
              before_write: Optional[Callable[[LearnerSnapshot], Any]] = None,
              peer_wait_s: float = 0.0) -> CheckpointJob:
        """Snapshot now (loop thread, learner idle) and hand the rest to the background threads.
        ``before_write(snapshot)`` runs on the write thread before the files are written (what must
        reach Kafka before the checkpoint is committed); what it raises fails the checkpoint."""
        began = time.perf_counter()
        learner = self.learner
        if len(learner.catalogue):
            learner.item_vectors()  # fresh vector tables to publish from while the model is held
        with learner.lock:
            snapshot = LearnerSnapshot(learner)
            learner.training_in_flight = True  # the model stays as it is until prepared
        job = CheckpointJob(offsets=dict(offsets), extra=extra, snapshot_s=time.perf_counter() - began,
                            peer_wait_s=peer_wait_s)
        try:
            job.prepared = self.prepare_on.submit(self._prepare, job, snapshot, ledger)
        except BaseException:
            self._release()
            raise
        # With one executor for both (no background training) the prepare, queued first, runs first.
        job.future = self.write_on.submit(self._write, job, snapshot, before_write)
        return job

    def _prepare(self, job: CheckpointJob, snapshot: LearnerSnapshot, ledger: LedgerSnapshot) -> PreparedCheckpoint:
        try:
            return self.store.prepare(snapshot, {**job.extra, "ledger": ledger.state()})
        finally:
            self._release()

    def _write(self, job: CheckpointJob, snapshot: LearnerSnapshot,
               before_write: Optional[Callable[[LearnerSnapshot], Any]]) -> Path:
        if before_write is not None:
            before_write(snapshot)  # beside the prepare: it reads the snapshot's copies only
        prepared = job.prepared.result()  # raises what the prepare raised
        began = time.perf_counter()
        try:
            return self.store.write(prepared, peer_wait_s=job.peer_wait_s)
        finally:
            heap.trim()
            job.write_s = time.perf_counter() - began

    def _release(self) -> None:
        with self.learner.lock:
            self.learner.training_in_flight = False
