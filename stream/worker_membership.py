"""Consumer-group membership: assignment, revocation, loss, and rejoining without losing work.

Asked to rejoin, the worker finishes the experience in flight, checkpoints
and commits while still a member (``_before_rebalance``). A revocation that
still catches it mid-experience, or a forced exit from the group, sends it
back to its last checkpoint (``_rollback_reason``; see
stream/worker_checkpoints.py), since the next owners read on from that
checkpoint's commit.

A mixin of ``stream.worker.Worker``: it reads and sets the worker's state.
"""

from __future__ import annotations

import logging

from stream.worker_output import Undelivered

log = logging.getLogger("stream.worker")


class MembershipMixin:
    def _before_rebalance(self) -> None:
        """The group asked this member to rejoin: its partitions go when it next polls. Finish the
        experience in flight, checkpoint and commit now, as a member still (the heartbeat keeps
        running meanwhile; the rebalance waits up to max.poll.interval.ms), so the revocation has
        nothing left to save and the next owners start exactly where this state ends."""
        if self._training_job is not None:
            log.info("rebalance requested: finishing the experience in flight, then checkpointing")
            self._collect_training(wait=True)
        self.checkpoint()  # the join may take a few turns: only what changed is saved again

    def _on_assigned(self, partitions: list[tuple[str, int]]) -> None:
        self.metrics.rebalances.inc()
        self.metrics.partitions.set(len(self.events.assignment()))
        # No seek: the group resumes at the committed offset, which is never ahead of our
        # checkpoint unless another member moved it on (then it is right to start there);
        # records below what we already applied are skipped in _ingest_events.
        self.metrics.ready = True
        log.info("assigned %s", partitions)

    def _on_revoked(self, partitions: list[tuple[str, int]]) -> None:
        self.metrics.rebalances.inc()
        if partitions and not self._closing:
            if self._training and not (self._training_job is not None and self._training_job.done()):
                # Mid-experience state is not a consistent checkpoint (and waiting here for the
                # experience would hold up the consumer's I/O thread, heartbeats included): the
                # last checkpoint and its commit stand, the next owners read on from there, and
                # this worker goes back to that checkpoint too, or both would apply those records.
                # _before_rebalance makes this rare.
                log.info("revoked %s during training: offsets stay at the last checkpoint", partitions)
                self._rollback_reason = f"partitions {partitions} revoked mid-experience"
            else:
                log.info("revoked %s: checkpointing and committing what is done", partitions)
                try:
                    saved = self.checkpoint(in_rebalance=True)
                except Undelivered:  # stopping while Kafka refuses our output
                    saved = False
                if not saved:  # the partitions go uncommitted: the next owners read from the last commit
                    self._rollback_reason = f"partitions {partitions} revoked without a checkpoint"
        self.metrics.partitions.set(0)

    def _on_lost(self, partitions: list[tuple[str, int]]) -> None:
        """Forced out of the group: the partitions may be another member's already, a commit would
        be refused, so go back to the last checkpoint (whose offsets were committed)."""
        self.metrics.rebalances.inc()
        self.metrics.partitions.set(0)
        if partitions and not self._closing:
            log.warning("lost %s (this member was forced out of the group)", partitions)
            self._rollback_reason = f"partitions {partitions} lost"
