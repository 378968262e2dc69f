"""Consumer-group membership: assignment, revocation, loss, and rejoining without losing work.

Asked to rejoin, the worker finishes the experience in flight, checkpoints
and commits while still a member (``before_rebalance``). A revocation that
still catches it mid-experience, or a forced exit from the group, sends it
back to its last checkpoint (``Checkpointer.request_rollback``), since the
next owners read on from that checkpoint's commit.
"""

from __future__ import annotations

import logging

from stream.metrics import WorkerMetrics
from stream.worker.checkpointer import Checkpointer
from stream.worker.consumers import Consumers
from stream.worker.handover import PartitionHandover
from stream.worker.lifecycle import Lifecycle
from stream.worker.publisher import Undelivered
from stream.worker.trainer import Trainer

log = logging.getLogger("stream.worker")


class Membership:
    def __init__(self, metrics: WorkerMetrics, consumers: Consumers, trainer: Trainer,
                 checkpointer: Checkpointer, lifecycle: Lifecycle, handover: PartitionHandover) -> None:
        self.metrics = metrics
        self.consumers = consumers
        self.trainer = trainer
        self.checkpointer = checkpointer
        self.lifecycle = lifecycle
        self.handover = handover
        self.rewind = None  # --distributed: a stream.worker.group_restore.GroupRewind

    def before_rebalance(self) -> None:
        """The group asked this member to rejoin: its partitions go when it next polls. Finish the
        experience in flight, checkpoint and commit now, as a member still (the heartbeat keeps
        running meanwhile; the rebalance waits up to max.poll.interval.ms), so the revocation has
        nothing left to save and the next owners start exactly where this state ends."""
        if self.trainer.in_flight:
            log.info("rebalance requested: finishing the experience in flight, then checkpointing")
            self.trainer.collect(wait=True)
        self.checkpointer.checkpoint()  # the join may take a few turns: only what changed is saved again

    def on_assigned(self, partitions: list[tuple[str, int]]) -> None:
        self.metrics.rebalances.inc()
        self.metrics.partitions.set(len(self.consumers.events.assignment()))
        # No seek: the group resumes at the committed offset, which is never ahead of our
        # checkpoint unless another member moved it on (then it is right to start there);
        # records below what we already applied are skipped by Ingest.apply_events. Except
        # (--distributed) where the group went back to older checkpoints: GroupRewind.
        self.metrics.ready = True
        if partitions:
            self.checkpointer.note_assigned()
        if self.rewind is not None:  # --distributed, after a rank went back: some are read again
            self.rewind.hold(self.consumers.events, partitions)
        self.handover.hold(self.consumers.events, partitions)  # where they start, their users' histories first
        log.info("assigned %s", partitions)

    def on_revoked(self, partitions: list[tuple[str, int]]) -> None:
        self.metrics.rebalances.inc()
        if partitions and not self.lifecycle.closing:
            if self.trainer.mid_experience:
                # Mid-experience state is not a consistent checkpoint (and waiting here for the
                # experience would hold up the consumer's I/O thread, heartbeats included): the
                # last checkpoint and its commit stand, the next owners read on from there, and
                # this worker goes back to that checkpoint too, or both would apply those records.
                # before_rebalance makes this rare.
                log.info("revoked %s during training: offsets stay at the last checkpoint", partitions)
                self.checkpointer.request_rollback(f"partitions {partitions} revoked mid-experience")
            else:
                log.info("revoked %s: checkpointing and committing what is done", partitions)
                try:
                    saved = self.checkpointer.checkpoint(in_rebalance=True)
                except Undelivered:  # stopping while Kafka refuses our output
                    saved = False
                if not saved:  # the partitions go uncommitted: the next owners read from the last commit
                    self.checkpointer.request_rollback(f"partitions {partitions} revoked without a checkpoint")
        self.metrics.partitions.set(0)

    def on_lost(self, partitions: list[tuple[str, int]]) -> None:
        """Forced out of the group: the partitions may be another member's already, a commit would
        be refused, so go back to the last checkpoint (whose offsets were committed)."""
        self.metrics.rebalances.inc()
        self.metrics.partitions.set(0)
        if partitions and not self.lifecycle.closing:
            log.warning("lost %s (this member was forced out of the group)", partitions)
            self.checkpointer.request_rollback(f"partitions {partitions} lost")
