"""``--distributed``: which checkpoints the group resumes from, and reading again what it gave up.

Every rank checkpoints in the group's agreed turns, numbered alike on every rank
(``group_turn`` in each checkpoint, also in those a rank takes alone between two
turns: rebalances). A checkpoint's group offsets are what every rank held at its
turn, so the ranks must resume from checkpoints of one turn: a rank restoring an
older turn than another would hold less than the other's offsets claim for its
partitions, and what lies between would be read by no one. On the restart
torchrun's elastic agent makes, every rank lists the (model version, group turn)
marks of its complete checkpoints, the lists are gathered, and each rank loads
its newest checkpoint of the newest mark all of them have (checkpoint folders are
atomic: a rank killed while writing keeps its previous one). A rank that goes
back past checkpoints it had committed must read its partitions again from the
older checkpoint's offsets: the group's commits are ahead of them. The other
way round, a rank killed after its checkpoint was written but before its commit
landed leaves the commit behind the checkpoints: a new owner of the partition,
which holds none of it, would read and train again what the group's model
already holds, so it reads on from the checkpoints' offset instead (the user
histories follow from the changelog as of there, which a complete checkpoint
has sent). ``GroupRewind`` seeks to the checkpoints' offset, once per partition,
and only while the commit is still the one seen at start (another rank may have
read the partition since, and committed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from learners.checkpoint import checkpoint_version, complete_checkpoints
from learners.errors import RecstreamError
from stream.kafka.errors import BrokerError

log = logging.getLogger("stream.worker")

Partition = tuple[str, int]
Mark = tuple[int, int]  # (model version, group turn) a checkpoint was written at

GROUP_TURN = "group_turn"  # the checkpoint's extra: the last agreed turn when it was written


class RanksDisagree(RecstreamError):
    """``--distributed``: the ranks' checkpoints hold different models; the message says how to line them up."""


class RankMustRestart(RecstreamError):
    """``--distributed``: this rank's state would go back to its checkpoint alone, leaving its weights
    behind the group's; it exits so that torchrun restarts the group from the checkpoint turn every rank has."""


def checkpoint_mark(path: Path) -> Optional[Mark]:
    """The (model version, group turn) of a complete checkpoint folder; None when its bookkeeping
    cannot be read (the restore then skips it as torn). Checkpoints without a turn count as turn 0."""
    try:
        turn = json.loads((path / "extra.json").read_bytes()).get(GROUP_TURN, 0)
    except (OSError, ValueError):
        return None
    return checkpoint_version(path), int(turn)


def held_marks(state_dir: Path) -> list[Mark]:
    """The marks of the complete checkpoints in ``state_dir``, ascending."""
    return sorted({mark for path in complete_checkpoints(state_dir) if (mark := checkpoint_mark(path))})


def checkpoints_at(state_dir: Path, mark: Mark) -> list[Path]:
    """The complete checkpoints of ``mark`` in ``state_dir``, newest first."""
    return [path for path in complete_checkpoints(state_dir) if checkpoint_mark(path) == tuple(mark)]


def common_mark(per_rank: list[list[Mark]], state_dirs: str = "rank-*") -> Optional[Mark]:
    """The newest (model version, group turn) every rank has a complete checkpoint of; None when
    no rank has any. ``RanksDisagree`` when some rank has checkpoints but none is common to all."""
    if not any(per_rank):
        return None
    common = set(map(tuple, per_rank[0])).intersection(*(set(map(tuple, marks)) for marks in per_rank[1:]))
    if not common:
        held = "; ".join(f"rank {rank}: {said_marks(marks)}" for rank, marks in enumerate(per_rank))
        raise RanksDisagree(
            f"the ranks hold no checkpoint of one model version and group turn in common ({state_dirs}; {held}): "
            "start every rank from checkpoints of the same version and turn (copy into the rank folders lacking "
            "it a ckpt-<version>-* folder whose extra.json says that \"group_turn\"), or remove every rank's folder "
            "to start the group over")
    return max(common)


def agreeing_ranks(per_rank: list[list[Mark]]) -> tuple[list[int], Optional[Mark]]:
    """The ranks the group resumes from, and the newest mark they all hold: the rank with the newest
    mark (the lowest such rank), and each other rank with checkpoints that shares a mark with those
    taken so far, in rank order. A rank left out has none, or only marks none of them holds: its
    folder is from an earlier time of the group (a pod scaled away and back, a rank that was down
    while the others went on), and it starts from theirs (``group_join``). ([], None): no rank has any."""
    holders = [rank for rank, marks in enumerate(per_rank) if marks]
    if not holders:
        return [], None
    newest = max(holders, key=lambda rank: (max(map(tuple, per_rank[rank])), -rank))
    common, members = set(map(tuple, per_rank[newest])), [newest]
    for rank in holders:
        shared = common.intersection(map(tuple, per_rank[rank]))
        if rank != newest and shared:
            common, members = shared, members + [rank]
    return sorted(members), max(common)


def said_marks(marks: list[Mark]) -> str:
    return ", ".join(f"v{version} turn {turn}" for version, turn in sorted(map(tuple, marks))) or "none"


def group_offsets(per_rank: list[dict[Partition, int]]) -> dict[Partition, int]:
    """Per partition, the offset the group's restored model holds events up to (the highest a rank's
    checkpoint has: a partition that moved is further on at its last owner)."""
    out: dict[Partition, int] = {}
    for offsets in per_rank:
        for tp, offset in offsets.items():
            out[tp] = max(offset, out.get(tp, offset))
    return out


def _behind(offset: int, committed: Optional[int]) -> bool:
    """Whether checkpoints holding a partition up to ``offset`` are behind its commit."""
    return committed is not None and committed > offset


class GroupRewind:
    """Partitions whose committed offset is not where the group's restored checkpoints hold them, and where the
    group's model starts on every partition (``start``), which each rank's checkpoints carry on."""

    def __init__(self, offsets: dict[Partition, int]) -> None:
        self.offsets = offsets
        # partition: (checkpoint's offset, commit at start; None: never committed)
        self.targets: dict[Partition, tuple[int, Optional[int]]] = {}
        self.held: set[Partition] = set()
        self.start: dict[Partition, int] = {}

    def snapshot(self, events, topic: str) -> None:
        """At start, before anything is read: the partitions whose commit is not where the restored
        checkpoints hold them (ahead of them, or behind), and where the model starts on each
        partition (the checkpoints' offset, else the commit, else 0: the consumer reads an
        uncommitted partition from its beginning). Every partition is named, so a later start
        knows the model had nothing of one that was committed only since."""
        self.targets, self.start = {}, dict(self.offsets)
        for partition in events.partitions(topic):
            tp = (topic, partition)
            committed = events.committed(*tp)
            if tp not in self.offsets:
                self.start[tp] = committed if committed is not None else 0
            elif (committed or 0) != self.offsets[tp]:
                # Behind the commit: the group went back to older checkpoints. Ahead of it (or
                # never committed): the owner's commit had not landed, and a consumer would start
                # from the commit, over what the group's model already holds.
                self.targets[tp] = (self.offsets[tp], committed)
        back = {tp: o for tp, (o, c) in sorted(self.targets.items()) if _behind(o, c)}
        on = {tp: o for tp, (o, c) in sorted(self.targets.items()) if not _behind(o, c)}
        if back:
            log.info("the group resumes from checkpoints behind its commits: %s are read again from %s",
                     sorted(back), back)
        if on:
            log.info("the group's checkpoints hold more than was committed: %s are read on from %s",
                     sorted(on), on)

    def covered(self, applied: dict[Partition, int]) -> dict[Partition, int]:
        """Per partition, the offset the group's model holds events up to as this rank knows it: where
        it started, or further where this rank applied more. Kept in each checkpoint, so a later start
        knows it for partitions this rank has read nothing of (a rank's own offsets name only those)."""
        out = dict(self.start)
        for tp, offset in applied.items():
            out[tp] = max(offset, out.get(tp, offset))
        return out

    def learn_group(self, per_rank: list[dict[Partition, int]]) -> None:
        """Every rank's ``covered`` offsets, gathered in a turn where all ranks checkpoint: from now
        on this rank's checkpoints name where the group's model is on every partition, those the
        other ranks read included. A smaller group restarting from them then reads nothing again
        that the model already learned from a departed rank."""
        for tp, offset in group_offsets(per_rank).items():
            self.start[tp] = max(offset, self.start.get(tp, offset))

    def hold(self, events, partitions: list[Partition]) -> None:
        """Rebalance callback (no I/O there): fetch nothing of these yet, the loop settles them."""
        held = [tp for tp in partitions if tp in self.targets]
        if held:
            events.hold(held)
            self.held.update(held)

    def settle(self, events) -> None:
        """Loop thread, after the poll: seek each held partition back if its commit has not moved."""
        assigned = set(events.assignment())
        for tp in sorted(self.held & assigned):
            offset, at_start = self.targets[tp]
            try:
                committed = events.committed(*tp)
            except BrokerError as exc:
                log.warning("%s: cannot read its committed offset (%s); held until the next turn", tp, exc)
                continue
            del self.targets[tp]
            if committed == at_start:
                events.seek(*tp, offset)
                if not _behind(offset, at_start):
                    log.info("%s[%d]: reading on from offset %d, where the group's checkpoints hold it up to "
                             "(%s)", tp[0], tp[1], offset, "nothing of it was committed" if at_start is None
                             else f"it was committed only up to {at_start}")
                else:
                    log.info("%s[%d]: reading again from offset %d, where the group's checkpoints hold it up to "
                             "(it was committed up to %d)", tp[0], tp[1], offset, at_start)
        settled = sorted(tp for tp in self.held if tp not in self.targets or tp not in assigned)
        events.release(settled)
        self.held.difference_update(settled)
