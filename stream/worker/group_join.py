"""``--distributed``: a rank without checkpoints starts from the group's model.

A rank with no checkpoint of its own while others have some starts from the
newest checkpoint of the newest mark (model version, group turn) every rank
with checkpoints has, taken from the lowest such rank: hard-linked from its
folder where this rank can reach it (rank 0's, on one host or a shared volume),
else sent over the process group, file by file (a pod with a volume of its
own). Either the group grew (the rank is beyond the ``world_size`` its
checkpoints record), or the rank is one of the recorded group whose first
checkpoint never got written (it died at its first start) or whose folder was
lost. The model is the group's (data-parallel: the same on every rank), its
users come with their partitions through the changelog, and the group's
checkpoints name every partition's offset (``group_offsets``): nothing of the
rank's own is needed, so the group carries on rather than waiting for someone
to copy a folder.
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
    this rank joined, with the source rank's checkpoint now in ``store``. Every rank takes part in
    the collectives below, or none does: the decision to start them depends on ``marks`` alone."""
    held = [set(map(tuple, m)) for m in marks if m]
    if all(marks) or not held or not set.intersection(*held):
        return False  # nobody lacks checkpoints, or nobody has any, or no mark to agree on
    rank, mark = collective.rank, max(set.intersection(*held))
    src = next(r for r, m in enumerate(marks) if m)  # the lowest rank with checkpoints
    source = _newest(store.state_dir, mark) if rank == src else None
    world = collective.broadcast_object(_recorded_world(source), src=src)
    joining = not marks[rank]
    if joining:
        if world is not None and rank < world:
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
