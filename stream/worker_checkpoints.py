"""Checkpoints, commits and going back to a checkpoint: the worker's exactly-once bookkeeping.

A checkpoint holds the learner and everything applied up to ``_offsets``
(the next event offset per partition applied to state), the items offsets,
the de-duplication window, the totals and the dead-letter bookkeeping of
stream/recovery.py. Its offsets are committed only once it is durable and
everything the records before them produced is acknowledged by Kafka.
Periodic checkpoints are written off the loop (stream/checkpoint_writer.py):
the loop takes the snapshot, the trainer thread prepares it, the writer
thread writes it while training goes on, and a later turn commits it
(``_collect_checkpoint``). Checkpoints at shutdown, before a
rebalance and on revocation are waited for.

A mixin of ``stream.worker.Worker``: it reads and sets the worker's state.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from kafka import KafkaConsumer

from learners.errors import RecstreamError
from stream.dedup import EventLedger
from stream.kafka_io import SourceRecord
from stream.recovery import Source, scan_dead_letters
from stream.worker_output import BOOTSTRAP_TIMEOUT_MS

log = logging.getLogger("stream.worker")


@dataclass
class Totals:
    """The worker's own accounting (also in the checkpoint): consumed = valid + dead-lettered + duplicates."""
    consumed: int = 0
    valid: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    items: int = 0


class CheckpointMixin:
    def _restore(self) -> bool:
        """Load the newest complete checkpoint (learner, offsets, ledger, totals); False if none."""
        extra = self.store.load_latest(self.learner)
        if self.store.fallbacks:
            self.metrics.checkpoint_fallbacks.inc(self.store.fallbacks)
        if extra is None:
            log.info("no checkpoint in %s: starting fresh", self.settings.state_dir)
            return False
        self._saved_origin = extra.get("origin")
        self._offsets = {(t, int(p)): int(o) for t, p, o in extra.get("event_offsets", [])}
        self._checkpointed = dict(self._offsets)
        self._item_start = {int(p): int(o) for p, o in extra.get("item_offsets", [])}
        self.ledger = EventLedger.from_state(self.settings.dedup_window, extra.get("ledger", []))
        self.totals = Totals(**extra.get("totals", {}))
        self._dlq_done |= {(t, int(p), int(o)) for t, p, o in extra.get("dlq_done", [])}
        if "dlq_positions" in extra:
            self._dlq_positions_known = True
            for p, o in extra["dlq_positions"]:
                self._dlq_positions[int(p)] = max(self._dlq_positions.get(int(p), 0), int(o))
        # Vectors of versions above the checkpoint's may have gone out before a crash, from a
        # model that is lost now: continue above all of them, so versions never go backwards.
        published = self._version_mark.value
        if published > self.learner.model_version:
            log.info("vectors up to model version %d were published after checkpoint version %d: "
                     "continuing at version %d", published, self.learner.model_version, published + 1)
            self.learner.model_version = published + 1
        # Build the vector tables now: while an experience is in flight they are not rebuilt, and
        # the restored pending samples can start one before the first vector is published.
        self.learner.item_vectors()
        self.metrics.model_version.set(self.learner.model_version)
        log.info("resumed from checkpoint: model version %d, %d users, %d items, %d event partitions",
                 self.learner.model_version, len(self.learner.users), len(self.learner.catalogue),
                 len(self._offsets))
        return True

    def _recover_dead_letters(self) -> None:
        """Read the dead-letter topic from the checkpoint's positions (all of it without a
        checkpoint) and remember the sources found there whose offsets will be read again."""
        s = self.settings
        consumer = KafkaConsumer(**s.reader_kwargs("dlq-scan"), bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
        try:
            start = self._dlq_positions if self._dlq_positions_known else {}
            found, ends = scan_dead_letters(consumer, s.dlq_topic, start, (s.events_topic, s.items_topic))
        finally:
            consumer.close(autocommit=False)
        again = {source for source in found if not self._below_applied(source)}
        self._dlq_done |= again
        for p, o in ends.items():
            self._dlq_positions[p] = max(self._dlq_positions.get(p, 0), o)
        self._dlq_positions_known = True
        log.info("dead-letter topic %r read from %s: %d record(s) there come from offsets this worker will "
                 "read again; they will not be dead-lettered twice", s.dlq_topic, start or "the beginning", len(again))

    def _below_applied(self, source: Source) -> bool:
        """True when ``source`` lies below the offsets this worker's state already holds."""
        items = self.items.offsets if self.items is not None else self._item_start
        return self._below(source, self._offsets, items)

    def _below(self, source: Source, events: dict, items: dict) -> bool:
        """True when ``source`` lies below these event offsets (per (topic, partition)) or item offsets."""
        topic, partition, offset = source
        if topic == self.settings.events_topic:
            return offset < events.get((topic, partition), 0)
        if topic == self.settings.items_topic:
            return offset < items.get(partition, 0)
        return True

    def _check_log_restarted(self, tp: tuple[str, int], offset: int) -> None:
        """Called when a fetch of ``tp`` starts at ``offset``, below the offsets already applied.
        A partition whose log now ends below them was deleted and created again (or lost data):
        its offsets start over, and skipping the new records as "already applied" would lose
        them. Read them as new from the first one fetched."""
        applied = self._offsets.get(tp, 0)
        end = self.events.highwater(*tp)
        if end is not None and end < applied:
            log.error("%s[%d] ends at offset %d, below the %d records this worker applied: the topic was "
                      "deleted and created again (or lost data); reading it as new from offset %d",
                      tp[0], tp[1], end, applied, offset)
            self._offsets[tp] = offset
            self._dlq_done = {s for s in self._dlq_done if (s[0], s[1]) != tp}

    def checkpoint(self, in_rebalance: bool = False, wait: bool = True) -> bool:
        """Save everything applied so far, then commit exactly those offsets.

        The snapshot is taken now; the rest runs on the background threads. With
        ``wait`` (shutdown, rebalances, tools) this returns once the checkpoint is
        durable and committed, False when it could not be written (the last one
        stands). Without, it returns True at once and a later turn commits it
        (``_collect_checkpoint``).
        """
        self._last_checkpoint = time.monotonic()
        if self._checkpoint_job is not None:  # one write at a time, in order
            self._collect_checkpoint(wait=True, in_rebalance=in_rebalance)
        if not self._dirty_since_checkpoint:
            if self._commit_pending and not self._rollback_reason:
                self._commit(in_rebalance)  # the last checkpoint stands; its commit was refused
            return True
        if self._rollback_reason:
            return False  # this state holds records of partitions given up uncommitted: never save it
        self._publish_queued_users(force=True)
        self._deliver()  # what the checkpoint covers is in Kafka before its offsets are committed
        dlq_positions = dict(self._dlq_positions)
        for partition, offset in self.dead_letters.next_offsets.items():
            dlq_positions[partition] = max(dlq_positions.get(partition, 0), offset)
        self._dlq_positions = dlq_positions
        extra = {
            "event_offsets": [[t, p, o] for (t, p), o in sorted(self._offsets.items())],
            "item_offsets": sorted(self.items.offsets.items()) if self.items else [],
            "totals": dict(vars(self.totals)),
            # Dead letters sent for offsets above these ones, and where a restart starts looking
            # for more in the dead-letter topic (stream/recovery.py).
            "dlq_done": sorted([t, p, o] for t, p, o in self._dlq_done if not self._below_applied((t, p, o))),
            "dlq_positions": sorted([p, o] for p, o in dlq_positions.items()),
            # Which cluster, group and topics these offsets belong to (stream/origin.py).
            "origin": self._origin.as_dict() if self._origin is not None else self._saved_origin,
        }  # + "ledger", encoded on the writer thread from this snapshot of it
        self._checkpoint_job = self._checkpoint_writer().start(self._offsets, extra, self.ledger.snapshot())
        self._dirty_since_checkpoint = False
        if not wait:
            return True
        return bool(self._collect_checkpoint(wait=True, in_rebalance=in_rebalance))

    def _collect_checkpoint(self, wait: bool = False, in_rebalance: bool = False) -> Optional[bool]:
        """Loop thread: once the checkpoint in flight is durable, commit its offsets.

        None while it is still being written (``wait`` False) or when none is in
        flight; else whether it was written.
        """
        job = self._checkpoint_job
        if job is None or not (wait or job.done()):
            return None
        self._checkpoint_job = None
        try:
            job.result()
        except (OSError, RecstreamError) as exc:
            self.metrics.checkpoint_failures.inc()
            self._dirty_since_checkpoint = True  # what it held is still to be saved
            log.error("checkpoint failed, offsets stay uncommitted: %s", exc)
            return False
        self.metrics.checkpoints.inc()
        self.metrics.last_checkpoint.set(time.time())
        if self._first_applied_at is not None and job.started >= self._first_applied_at:
            self._checkpointed_since_start = True
        self._checkpointed = dict(job.offsets)
        # Dead letters below what this checkpoint holds are never read again: forget them.
        items_held = {int(p): int(o) for p, o in job.extra["item_offsets"]}
        self._dlq_done = {source for source in self._dlq_done
                          if not self._below(source, self._checkpointed, items_held)}
        self._commit(in_rebalance)
        return True

    def _commit(self, in_rebalance: bool) -> None:
        """Commit exactly the last checkpoint's offsets of the partitions this member holds."""
        assigned = set(self.events.assignment()) if self.events else set()
        offsets = {tp: o for tp, o in self._checkpointed.items() if tp in assigned}
        if in_rebalance:
            self.events.commit_nowait(offsets)  # failures are logged and counted by its callback
            self._commit_pending = False
        else:
            self._commit_pending = not self.events.commit(offsets)

    def _roll_back(self) -> None:
        """Go back to the last checkpoint: this state holds records of partitions that went to
        other members without a commit, and they read those records again."""
        reason, self._rollback_reason = self._rollback_reason, None
        self._collect_training(wait=True)
        job, self._checkpoint_job = self._checkpoint_job, None
        if job is not None:
            # A write still in flight here (partitions lost, or revoked while an experience
            # trained beside the write) becomes durable after they went: its offsets can be
            # committed nowhere, and the next owners read on from the commit before it. Going
            # back to it would hold their records twice: go back to the one before.
            try:
                path = job.result()
            except (OSError, RecstreamError):
                path = None
            if path is not None:
                log.warning("checkpoint %s was written after the partitions were lost and cannot be committed: "
                            "removing it", path.name)
                shutil.rmtree(path, ignore_errors=True)
        self._rollback_reason = None  # a callback during that wait changes nothing: we go back anyway
        log.warning("%s: going back to the last checkpoint (records after it are read again; "
                    "nothing is applied twice)", reason)
        if not self._restore():
            raise RecstreamError(f"cannot go back to a checkpoint in {self.settings.state_dir}: there is none "
                                 "(see the checkpoint errors above); restarting from scratch is safe")
        if self.items is not None:
            self.items.restart_from(self._item_start)
        self._stash = []
        self._unpublished, self._unpublished_stamps = {}, []  # their events are read again
        self._dirty_since_checkpoint = False
        self.metrics.pending.set(self.learner.pending)
