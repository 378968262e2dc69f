"""``--distributed``: the loop's turns agreed across ranks, so collectives meet in one order.

Every turn each rank says what it would do (train, checkpoint, give new ids rows,
stop), whether it cannot touch the model now (a checkpoint being prepared) and
whether it must not train (a rejoin pending); one MAX all-reduce makes that the
group's turn. Rows are still agreed while a rank waits to rejoin: the checkpoint
it takes before giving its partitions up must hold the events that waited for
them. A training round
then runs on every rank, those with nothing pending too (learners/continual/distributed.py),
and checkpoints are taken in the same turn, so every rank's checkpoint holds the
same model version. The loop waits on the slowest rank once per turn (a poll is
at most 500 ms).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("stream.worker")


@dataclass(frozen=True)
class GroupTurn:
    train: bool  # some rank has an experience due
    busy: bool  # some rank cannot touch the model this turn (a checkpoint being prepared)
    rejoining: bool  # some rank waits to rejoin the consumer group: no training round now
    checkpoint: bool
    catalogue: bool  # new ids wait for rows, or item texts changed, on some rank
    stop: bool


class GroupTurns:
    def __init__(self, collective) -> None:
        self.collective = collective
        self.rank = collective.rank
        self.world_size = collective.world_size

    @property
    def publishes_items(self) -> bool:
        """Item vectors are the same on every rank: rank 0 alone publishes them."""
        return self.rank == 0

    def agree(self, *, train: bool, busy: bool, rejoining: bool, checkpoint: bool, catalogue: bool,
              stop: bool) -> GroupTurn:
        flags = self.collective.max_ints([train, busy, rejoining, checkpoint, catalogue, stop])
        return GroupTurn(*map(bool, flags))

    def any(self, flag: bool) -> bool:
        return bool(self.collective.max_int(int(flag)))

    def max_version(self, version: int) -> int:
        """One model version sequence: each rank's restored version and published mark, the highest wins."""
        return self.collective.max_int(version)

    def check_weights(self, learner) -> bool:
        """Log the trainable weights' digest on every rank; False (and an error) if ranks differ."""
        digest = weights_digest(learner)
        digests = self.collective.gather_objects(digest)
        same = len(set(digests)) == 1
        if same:
            log.info("rank %d of %d: model v%d, weights sha256 %s, the same on every rank", self.rank,
                     self.world_size, learner.model_version, digest)
        else:
            log.error("rank %d of %d: model v%d, weights differ across ranks: %s", self.rank, self.world_size,
                      learner.model_version, digests)
        return same


def weights_digest(learner) -> str:
    """sha256 over the trainable parameters, in order (the bytes, so equal means bit-identical)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in learner.model.named_parameters():
            if param.requires_grad:
                h.update(name.encode())
                h.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
