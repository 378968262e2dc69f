"""``--distributed``: a rank without the group's checkpoints starts from the group's model.

The group resumes from the ranks that agree (``agreeing_ranks``): the rank with the newest mark
(model version, group turn) and every rank sharing a mark with it. A rank outside them starts
from the newest checkpoint of the newest mark they all hold, taken from the lowest of them:
hard-linked from its folder where this rank can reach it (rank 0's, on one host or a shared
volume), else sent over the process group, file by file (a pod with a volume of its own).
Such a rank has no checkpoint (the group grew, its first start was cut short, its folder was
lost), or only checkpoints from an earlier time of the group (its pod was scaled away and back,
or it was down while the others went on, or elastic rendezvous gave it another rank). The
model is the group's (data-parallel: the same on every rank), its users come with their
partitions through the changelog, and the group's checkpoints name every partition's offset
(``group_offsets``): nothing of the rank's own is needed, so the group carries on rather than
waiting for someone to line folders up.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Iterator, Optional

from learners.checkpoint.store import CheckpointStore
from learners.continual.distributed import Collective
from stream.worker.group_restore import Mark, agreeing_ranks, checkpoints_at, said_marks

log = logging.getLogger("stream.worker")


def join_group(collective: Collective, store: CheckpointStore, marks: list[list[Mark]]) -> bool:
    """Every rank, with the marks each holds (gathered, so the same list on every rank): whether
    this rank joined, with the source rank's checkpoint now in ``store``. Every rank takes part in
    the collectives below, or none does: the decision to start them depends on ``marks`` alone."""
    members, mark = agreeing_ranks(marks)
    if not members or len(members) == len(marks):
        return False  # nobody has checkpoints, or every rank resumes from its own
    rank, src = collective.rank, members[0]
    source = _newest(store.state_dir, mark) if rank == src else None
    world = collective.broadcast_object(_recorded_world(source), src=src)
    joining = rank not in members
    if joining:
        if marks[rank]:
            log.warning("rank %d holds only checkpoints the group's do not share (%s; the group's newest in "
                        "common: v%d turn %d), from an earlier time of the group: it starts from rank %d's",
                        rank, said_marks(marks[rank]), mark[0], mark[1], src)
        elif world is not None and rank < world:
            log.warning("rank %d of the group of %d that wrote the checkpoints holds none (its first start was "
                        "cut short, or its folder was lost): it starts from rank %d's", rank, world, src)
        else:
            log.info("rank %d joins a group of %s", rank, world if world is not None else "unknown size")
    linked = _newest(store.peer, mark) if joining and src == 0 and store.peer is not None else None
    if linked is not None:
        log.info("rank %d starts from rank 0's %s (linked)", rank, store.copy_in(linked).name)
    wanted = collective.gather_objects(joining and linked is None)
    if not any(wanted):
        return joining
    listing = collective.broadcast_object(None if source is None else (source.name, store.files_of(source)), src=src)
    pieces = _pieces(collective, source, listing[1], src)
    if wanted[rank]:
        path = store.receive(listing[0], pieces)
        log.info("rank %d starts from rank %d's %s, sent over the process group", rank, src, path.name)
    else:
        for _ in pieces:  # the source sends; the others take part in each broadcast and keep nothing
            pass
    return joining


_TOKEN = ".group-token"


def rank_0_folder(collective: Collective, state_dir: Path, rank_0_dir: Path) -> Optional[Path]:
    """Every rank, together: rank 0's live state folder where this rank (above 0) can reach it, else
    None. Rank 0 leaves a fresh token in its folder and sends it; a folder named like rank 0's but
    without that token is not its (a volume of this pod's own, maybe with a folder from a time this
    pod was rank 0): linking from it would wait for checkpoints that never come."""
    token = None
    if collective.rank == 0:
        token = uuid.uuid4().hex
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / _TOKEN).write_text(token)
    token = collective.broadcast_object(token)
    if collective.rank == 0:
        return None
    try:
        reachable = (rank_0_dir / _TOKEN).read_text() == token
    except OSError:
        reachable = False
    if not reachable:
        log.info("rank 0's folder %s is not reachable from here (a volume of its own): this rank writes its "
                 "checkpoints whole and gets a copy of the group's over the process group", rank_0_dir)
    return rank_0_dir if reachable else None


def _newest(state_dir: Path, mark: Mark) -> Optional[Path]:
    return next(iter(checkpoints_at(state_dir, mark)), None)


def _recorded_world(path: Optional[Path]) -> Optional[int]:
    """The group size a checkpoint was written by (None: not known)."""
    if path is None:
        return None
    world = json.loads((path / "extra.json").read_bytes()).get("world_size")
    return None if world is None else int(world)


def _pieces(collective: Collective, source: Optional[Path], files: list[tuple[str, int]],
            src: int) -> Iterator[tuple[str, bytes]]:
    """Each file of rank ``src``'s checkpoint ``source``, broadcast in turn."""
    for name, size in files:
        data = (source / name).read_bytes() if source is not None else None
        yield name, collective.broadcast_bytes(data, size, src=src)
