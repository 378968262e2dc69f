"""``--distributed``: a rank that joins a grown group starts from rank 0's model.

Checkpoints record the size of the group that wrote them (``world_size``). A
rank beyond it (the group grew) has none of its own; it starts from rank 0's
newest checkpoint of the newest mark (model version, group turn) every rank with
checkpoints has:
hard-linked from rank 0's folder where it can reach it (one host, a shared
volume), else sent over the process group, file by file (a pod with a volume
of its own). Its users come with their partitions through the changelog.

A rank within the recorded group that has no checkpoints lost its folder:
only its checkpoints knew its partitions' offsets, so it is not made up;
``common_mark`` then refuses, saying what to do.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, Optional

from learners.checkpoint.store import CheckpointStore
from learners.distributed import Collective
from stream.worker.group_restore import Mark, checkpoints_at

log = logging.getLogger("stream.worker")


def join_group(collective: Collective, store: CheckpointStore, marks: list[list[Mark]]) -> bool:
    """Every rank, with the marks each holds (gathered, so the same list on every rank): whether
    this rank joined, with rank 0's checkpoint now in ``store``. Every rank takes part in the
    collectives below, or none does: the decision to start them depends on ``marks`` alone."""
    held = [set(map(tuple, m)) for m in marks if m]
    if all(marks) or not marks[0] or not set.intersection(*held):
        return False  # nobody joins, or rank 0 has nothing to start from, or no mark to agree on
    rank, mark = collective.rank, max(set.intersection(*held))
    source = _newest(store.state_dir, mark) if rank == 0 else None
    world = collective.broadcast_object(_recorded_world(source))
    joining = not marks[rank] and world is not None and rank >= world
    linked = _newest(store.peer, mark) if joining and store.peer is not None else None
    if linked is not None:
        log.info("rank %d joins a group of %d: starting from rank 0's %s", rank, world, store.copy_in(linked).name)
    wanted = collective.gather_objects(joining and linked is None)
    if not any(wanted):
        return joining
    listing = collective.broadcast_object(None if source is None else (source.name, store.files_of(source)))
    pieces = _pieces(collective, source, listing[1])
    if wanted[rank]:
        path = store.receive(listing[0], pieces)
        log.info("rank %d joins a group of %d: starting from rank 0's %s, sent over the process group", rank,
                 world, path.name)
    else:
        for _ in pieces:  # rank 0 sends; the others take part in each broadcast and keep nothing
            pass
    return joining


def _newest(state_dir: Path, mark: Mark) -> Optional[Path]:
    return next(iter(checkpoints_at(state_dir, mark)), None)


def _recorded_world(path: Optional[Path]) -> Optional[int]:
    """The group size a checkpoint was written by (None: not known)."""
    if path is None:
        return None
    world = json.loads((path / "extra.json").read_bytes()).get("world_size")
    return None if world is None else int(world)


def _pieces(collective: Collective, source: Optional[Path], files: list[tuple[str, int]]) -> Iterator[tuple[str, bytes]]:
    """Each file of rank 0's checkpoint ``source``, broadcast in turn."""
    for name, size in files:
        data = (source / name).read_bytes() if source is not None else None
        yield name, collective.broadcast_bytes(data, size)
