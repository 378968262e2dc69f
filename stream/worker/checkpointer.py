"""Checkpoints, commits and going back to a checkpoint: the worker's exactly-once bookkeeping.

A checkpoint holds the learner and everything applied up to the ingest's
applied offsets, the items offsets, the de-duplication window, the totals and
the dead-letter bookkeeping of stream/kafka/recovery.py. Its offsets are committed
only once it is durable and everything the records before them produced is
acknowledged by Kafka. Periodic checkpoints are written off the loop
(stream/worker/checkpoint_writer.py): the loop takes the snapshot, the trainer thread
prepares it, the writer thread writes it while training goes on, and a later
turn commits it (``collect``). Checkpoints at shutdown, before a rebalance and
on revocation are waited for.

When one is due (``due``): every ``checkpoint_interval_s``; every
``catch_up_checkpoint_s`` while behind; the first one ``first_checkpoint_s``
after this process first applied a record; one as soon as the first events
of newly assigned partitions are applied (before another experience starts); and
one right after a user was erased (stream/worker/forgetting.py), once durable the
older checkpoints, which still hold that user, are removed. A worker killed
sooner than the interval, over and over, still commits what it did.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Optional

from kafka import KafkaConsumer

from learners.checkpoint import CheckpointStore
from learners.errors import RecstreamError
from stream.config import Settings
from stream.kafka.origin import StreamOrigin
from stream.kafka.recovery import Source, scan_dead_letters
from stream.metrics import WorkerMetrics
from stream.worker.checkpoint_writer import CheckpointJob, CheckpointWriter
from stream.worker.consumers import Consumers
from stream.worker.dead_letter_book import DeadLetterBook
from stream.worker.forgetting import Forgetting
from stream.worker.group_restore import GROUP_TURN, Mark, checkpoints_at
from stream.worker.handover import PartitionHandover
from stream.worker.ingest import Ingest
from stream.worker.publisher import BOOTSTRAP_TIMEOUT_MS, Publisher
from stream.worker.totals import Totals
from stream.worker.trainer import Trainer

log = logging.getLogger("stream.worker")

# --distributed: a checkpoint every rank takes in the same turn waits on ranks > 0 up to this long
# for rank 0's of the same model version, to hard-link the group's weights (identical on every
# rank) from it rather than write them once more; past that it writes them.
PEER_WAIT_S = 30.0


class Checkpointer:
    def __init__(self, settings: Settings, learner, metrics: WorkerMetrics, totals: Totals,
                 consumers: Consumers, ingest: Ingest, publisher: Publisher, trainer: Trainer,
                 dead_letter_book: DeadLetterBook, forgetting: Forgetting, handover: PartitionHandover) -> None:
        self.settings = settings
        self.learner = learner
        self.metrics = metrics
        self.totals = totals
        self.consumers = consumers
        self.ingest = ingest
        self.publisher = publisher
        self.trainer = trainer
        self.book = dead_letter_book
        self.forgetting = forgetting
        self.handover = handover
        self.store = CheckpointStore(settings.state_dir)
        # Checkpoints are prepared on the trainer thread (on the writer's without background
        # training) and written on the writer's: see stream/worker/checkpoint_writer.py.
        self._writer_pool: Optional[ThreadPoolExecutor] = None
        self._writer: Optional[CheckpointWriter] = None
        self._job: Optional[CheckpointJob] = None  # the checkpoint in flight
        self._checkpointed: dict[tuple[str, int], int] = {}  # the last durable checkpoint's event offsets
        self._covered: dict[tuple[str, int], int] = {}  # --distributed: the restored one's group offsets
        self.rewind = None  # --distributed: a stream.worker.group_restore.GroupRewind
        self.group_turn = 0  # --distributed: the agreed checkpoint turns so far, alike on every rank
        self.world_size = 1  # --distributed: the group's ranks
        self._commit_pending = False  # the last checkpoint's commit was refused: try again
        # Set when this worker's state holds effects of partitions it gave up without a
        # checkpoint (revoked mid-experience, or forced out of the group): the next turn
        # goes back to the last checkpoint instead of writing one.
        self._rollback_reason: Optional[str] = None
        self._saved_origin: Optional[dict] = None  # the stream the restored checkpoint was read from
        self.origin: Optional[StreamOrigin] = None  # the stream this worker reads, once connected
        # Cadence.
        self._last_checkpoint = time.monotonic()
        self._dirty = False  # state changed since the last checkpoint
        self._first_applied_at: Optional[float] = None  # when this process first applied a record
        self._checkpointed_since_start = False  # a checkpoint holding this process's own events is durable
        self._events_lag = 0  # records behind the log ends, as of the last lag update
        self._last_poll_full = False  # the last poll returned all it may: more wait (known before the lag)
        self._last_items_at = float("-inf")  # when item texts last arrived
        # Partitions were assigned and no checkpoint holds their events yet: the first events read
        # from them are checkpointed at once (before another experience starts), so a worker
        # restarted again and again commits what it read as soon as the group lets it read.
        self._assigned_unsaved = False
        self._assigned_events = False
        # A user was erased: the next checkpoint is due at once, and once it is durable the older
        # ones (which still hold the user) go. ``_job_erases``: the job in flight is that checkpoint.
        self._erasure_unsaved = False
        self._job_erases = False

    # -- what the loop tells it --

    def mark_dirty(self) -> None:
        """State changed: the next checkpoint has something to save."""
        self._dirty = True

    def note_events(self, consumed: int) -> None:
        self._dirty = True
        if self._first_applied_at is None and consumed:
            self._first_applied_at = time.monotonic()
        if consumed and self._assigned_unsaved:
            self._assigned_events = True

    def note_erasure(self) -> None:
        """A user was erased: checkpoint now, then remove the checkpoints that still hold them."""
        self._dirty = True
        self._erasure_unsaved = True

    def note_assigned(self) -> None:
        self._assigned_unsaved = True

    def note_items(self) -> None:
        now = time.monotonic()
        self._last_items_at = now
        self._dirty = True
        if self._first_applied_at is None:
            self._first_applied_at = now  # encoded texts are progress a checkpoint keeps too

    def note_poll(self, full: bool) -> None:
        self._last_poll_full = full

    def note_lag(self, lag: int) -> None:
        self._events_lag = lag

    @property
    def saved_origin(self) -> Optional[dict]:
        return self._saved_origin

    @property
    def holds_learner(self) -> bool:
        """A checkpoint is being prepared: the model must stay as it is."""
        return self._job is not None and self._job.holds_learner()

    # -- going back --

    @property
    def rollback_reason(self) -> Optional[str]:
        return self._rollback_reason

    def request_rollback(self, reason: str) -> None:
        """This state holds effects of partitions given up uncommitted: the next turn goes back."""
        self._rollback_reason = reason

    def take_rollback_reason(self) -> Optional[str]:
        reason, self._rollback_reason = self._rollback_reason, None
        return reason

    # -- cadence --

    def due(self) -> bool:
        now = time.monotonic()
        since = now - self._last_checkpoint
        if since >= self.settings.checkpoint_interval_s:
            return True
        if self._dirty and since >= self.settings.catch_up_checkpoint_s and self._behind(now):
            return True
        if self._assigned_events or self._erasure_unsaved:
            return True
        first = self._first_applied_at
        return first is not None and not self._checkpointed_since_start \
            and now - first >= self.settings.first_checkpoint_s

    def _behind(self, now: float) -> bool:
        """Catching up: events wait in the log, or item texts arrived within the catch-up interval."""
        return (self._events_lag > 0 or self._last_poll_full
                or now - self._last_items_at < self.settings.catch_up_checkpoint_s)

    # -- restore --

    @property
    def covered_offsets(self) -> dict[tuple[str, int], int]:
        """``--distributed``: per partition, the offset the restored checkpoint's group model holds
        events up to (``GroupRewind.covered``; its own event offsets where it has none)."""
        return dict(self._covered)

    def restore(self, mark: Optional[Mark] = None) -> bool:
        """Load the newest complete checkpoint (learner, offsets, ledger, totals); False if none.
        ``mark`` (``--distributed``): the newest of that model version and group turn, one every rank has."""
        extra = self.store.load_latest(self.learner) if mark is None else self._load_mark(mark)
        if self.store.fallbacks:
            self.metrics.checkpoint_fallbacks.inc(self.store.fallbacks)
        if extra is None:
            log.info("no checkpoint in %s: starting fresh", self.settings.state_dir)
            return False
        self._saved_origin = extra.get("origin")
        self.group_turn = int(extra.get(GROUP_TURN, 0))
        offsets = {(t, int(p)): int(o) for t, p, o in extra.get("event_offsets", [])}
        self._checkpointed = dict(offsets)
        self._covered = {**offsets, **{(t, int(p)): int(o) for t, p, o in extra.get("group_offsets", [])}}
        self.ingest.restore(offsets, {int(p): int(o) for p, o in extra.get("item_offsets", [])},
                            extra.get("ledger", []))
        self.forgetting.restore({int(p): int(o) for p, o in extra.get("forget_offsets", [])})
        self.totals.load(extra.get("totals", {}))
        self.book.remember((t, int(p), int(o)) for t, p, o in extra.get("dlq_done", []))
        if "dlq_positions" in extra:
            self.book.advance({int(p): int(o) for p, o in extra["dlq_positions"]})
            self.book.positions_known = True
        # Vectors of versions above the checkpoint's may have gone out before a crash, from a
        # model that is lost now: continue above all of them, so versions never go backwards.
        published = self.publisher.version_mark.value
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
                 len(offsets))
        return True

    def _load_mark(self, mark: Mark) -> dict:
        """Load the group's checkpoint; the checkpoints after it go, or a later restore would pick them."""
        version, turn = mark
        extra = self.store.load_one_of(self.learner, checkpoints_at(self.store.state_dir, mark),
                                       f"of model version {version} and group turn {turn}")
        newer = self.store.remove_newer(self.store.last_path)
        if newer:
            self.metrics.checkpoint_rollbacks.inc()
            log.info("going back to checkpoint %s (model version %d), the newest every rank has complete "
                     "(group turn %d): this rank's newer %s are given up and removed; the records after it are "
                     "read again", self.store.last_path.name, version, turn, ", ".join(p.name for p in newer))
        return extra

    def recover_dead_letters(self) -> None:
        """Read the dead-letter topic from the checkpoint's positions (all of it without a
        checkpoint) and remember the sources found there whose offsets will be read again."""
        s = self.settings
        consumer = KafkaConsumer(**s.reader_kwargs("dlq-scan"), bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
        try:
            start = self.book.positions if self.book.positions_known else {}
            found, ends = scan_dead_letters(consumer, s.dlq_topic, start,
                                            (s.events_topic, s.items_topic, s.forget_topic))
        finally:
            consumer.close(autocommit=False)
        again = {source for source in found if not self._below_applied(source)}
        self.book.remember(again)
        self.book.advance(ends)
        self.book.positions_known = True
        log.info("dead-letter topic %r read from %s: %d record(s) there come from offsets this worker will "
                 "read again; they will not be dead-lettered twice", s.dlq_topic, start or "the beginning", len(again))

    def _below_applied(self, source: Source) -> bool:
        """True when ``source`` lies below the offsets this worker's state already holds."""
        return self._below(source, self.ingest.applied, self.consumers.item_offsets(self.ingest.item_start),
                           self.forgetting.offsets())

    def _below(self, source: Source, events: dict, items: dict, forget: dict) -> bool:
        """True when ``source`` lies below these event offsets (per (topic, partition)), item offsets
        or forget offsets (per partition)."""
        topic, partition, offset = source
        if topic == self.settings.events_topic:
            return offset < events.get((topic, partition), 0)
        if topic == self.settings.items_topic:
            return offset < items.get(partition, 0)
        if topic == self.settings.forget_topic:
            return offset < forget.get(partition, 0)
        return True

    # -- checkpoint and commit --

    def writer(self) -> CheckpointWriter:
        """The writer: checkpoints prepared on the trainer thread (no experience runs meanwhile)
        and written on a thread of their own; without background training, both on that one."""
        if self._writer is None:
            self._writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recstream-checkpoint")
            self._writer = CheckpointWriter(self.store, self.learner, self.trainer.executor or self._writer_pool,
                                            self._writer_pool)
        return self._writer

    def shutdown(self) -> None:
        if self._writer_pool is not None:
            self._writer_pool.shutdown(wait=True)  # a checkpoint write in flight finishes first
        self._writer_pool = None
        self._writer = None

    def checkpoint(self, in_rebalance: bool = False, wait: bool = True, agreed: bool = False) -> bool:
        """Save everything applied so far, then commit exactly those offsets.

        The snapshot is taken now; the rest runs on the background threads. With
        ``wait`` (shutdown, rebalances, tools) this returns once the checkpoint is
        durable and committed, False when it could not be written (the last one
        stands). Without, it returns True at once and a later turn commits it
        (``collect``). ``agreed`` (``--distributed``): every rank takes this one
        in the same turn, so a store with a peer waits for the peer's to link the
        group's files from it.
        """
        self._last_checkpoint = time.monotonic()
        if self._job is not None:  # one write at a time, in order
            self.collect(wait=True, in_rebalance=in_rebalance)
        if agreed and self.rewind is not None:
            # Every rank writes one, changed or not: the ranks then hold checkpoints of each turn alike.
            self.group_turn += 1
            self._dirty = self._dirty or not self._rollback_reason
        if not self._dirty:
            if self._commit_pending and not self._rollback_reason:
                self._commit(in_rebalance)  # the last checkpoint stands; its commit was refused
            return True
        if self._rollback_reason:
            return False  # this state holds records of partitions given up uncommitted: never save it
        self.publisher.publish_queued_users(force=True)
        self.publisher.deliver()  # what the checkpoint covers is in Kafka before its offsets are committed
        self.book.advance(self.publisher.dead_letter_ends())
        applied = self.ingest.applied
        items = self.consumers.items
        extra = {
            "event_offsets": [[t, p, o] for (t, p), o in sorted(applied.items())],
            "item_offsets": sorted(items.offsets.items()) if items else [],
            "forget_offsets": sorted(self.forgetting.offsets().items()),
            "totals": dict(vars(self.totals)),
            # Dead letters sent for offsets above these ones, and where a restart starts looking
            # for more in the dead-letter topic (stream/kafka/recovery.py).
            "dlq_done": sorted([t, p, o] for t, p, o in self.book.sent if not self._below_applied((t, p, o))),
            "dlq_positions": sorted([p, o] for p, o in self.book.positions.items()),
            # Which cluster, group and topics these offsets belong to (stream/kafka/origin.py).
            "origin": self.origin.as_dict() if self.origin is not None else self._saved_origin,
        }  # + "ledger", encoded on the writer thread from this snapshot of it
        if self.rewind is not None:  # --distributed: where the group's model is on every partition
            extra["group_offsets"] = [[t, p, o] for (t, p), o in sorted(self.rewind.covered(applied).items())]
            extra["world_size"] = self.world_size  # which ranks hold the group's offsets (a new rank may join)
            extra[GROUP_TURN] = self.group_turn  # whose offsets those are: restores agree on one turn
        # The users' histories as of these offsets, for the next owners of their partitions: sent and
        # waited for on the write thread, before the checkpoint (and so its commit) can be durable.
        changelog = self.handover.take(applied)
        send = None if changelog is None else partial(self.handover.send_from, changelog)
        peer_wait_s = PEER_WAIT_S if agreed and self.store.peer is not None else 0.0
        self._job = self.writer().start(applied, extra, self.ingest.ledger_snapshot(), before_write=send,
                                        peer_wait_s=peer_wait_s)
        self._job.changelog = changelog
        self._dirty = False
        self._job_erases, self._erasure_unsaved = self._erasure_unsaved, False
        if self._assigned_events:  # this one holds the assignment's first events
            self._assigned_unsaved = self._assigned_events = False
        if not wait:
            return True
        return bool(self.collect(wait=True, in_rebalance=in_rebalance))

    def collect(self, wait: bool = False, in_rebalance: bool = False) -> Optional[bool]:
        """Loop thread: once the checkpoint in flight is durable, commit its offsets.

        None while it is still being written (``wait`` False) or when none is in
        flight; else whether it was written.
        """
        job = self._job
        if job is None or not (wait or job.done()):
            return None
        self._job = None
        erases, self._job_erases = self._job_erases, False
        try:
            path = job.result()
        except (OSError, RecstreamError) as exc:
            self.metrics.checkpoint_failures.inc()
            self._dirty = True  # what it held is still to be saved
            self._erasure_unsaved |= erases
            self.handover.give_back(job.changelog)
            log.error("checkpoint failed, offsets stay uncommitted: %s", exc)
            return False
        if erases and path is not None:
            self._remove_older(path)
        self.metrics.checkpoints.inc()
        self.metrics.last_checkpoint.set(time.time())
        if self._first_applied_at is not None and job.started >= self._first_applied_at:
            self._checkpointed_since_start = True
        self._checkpointed = dict(job.offsets)
        # Dead letters below what this checkpoint holds are never read again: forget them.
        items_held = {int(p): int(o) for p, o in job.extra["item_offsets"]}
        forget_held = {int(p): int(o) for p, o in job.extra["forget_offsets"]}
        self.book.forget(lambda source: self._below(source, self._checkpointed, items_held, forget_held))
        self._commit(in_rebalance)
        return True

    def _remove_older(self, path) -> None:
        """The checkpoint after an erasure is durable: the older ones still hold the user."""
        try:
            removed = self.store.remove_older(path)
        except (OSError, RecstreamError) as exc:
            self._erasure_unsaved = True  # the next checkpoint tries again
            log.error("could not remove the checkpoints older than %s, which hold an erased user: %s",
                      path.name, exc)
            return
        if removed:
            log.info("removed %d checkpoint(s) older than %s: they held an erased user", len(removed), path.name)

    def _commit(self, in_rebalance: bool) -> None:
        """Commit exactly the last checkpoint's offsets of the partitions this member holds."""
        events = self.consumers.events
        assigned = set(events.assignment()) if events else set()
        offsets = {tp: o for tp, o in self._checkpointed.items() if tp in assigned}
        if in_rebalance:
            events.commit_nowait(offsets)  # failures are logged and counted by its callback
            self._commit_pending = False
        else:
            self._commit_pending = not events.commit(offsets)

    def roll_back(self, reason: str) -> None:
        """Go back to the last checkpoint: this state holds records of partitions that went to
        other members without a commit, and they read those records again. The experience in
        flight must have been collected."""
        job, self._job = self._job, None
        self._job_erases = False  # the forget requests after the restored checkpoint are read again
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
        self.handover.forget_changes()  # the records after the checkpoint are read, and noted, again
        log.warning("%s: going back to the last checkpoint (records after it are read again; "
                    "nothing is applied twice)", reason)
        if not self.restore():
            raise RecstreamError(f"cannot go back to a checkpoint in {self.settings.state_dir}: there is none "
                                 "(see the checkpoint errors above); restarting from scratch is safe")
        self._dirty = False
