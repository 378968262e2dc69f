"""Erasing a user from a learner (the right to be forgotten).

What a learner holds of one user: their history ring and profile
(``UserHistories``), their samples waiting for training, and their samples in
the replay reservoir (found by owner tag). All of it goes. The model weights
are not per-user data: they are shared by every user and stay as they are.

Erasing twice, or a user the learner never saw, changes nothing, so a worker
that goes back to a checkpoint and reads the same erasure again is safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from learners.errors import RecstreamError
from learners.state.users import owner_tag


@dataclass(frozen=True)
class Erasure:
    """What one erasure removed."""
    user_id: str
    history: bool  # the learner held a history of theirs
    pending_samples: int
    replay_samples: int

    @property
    def found(self) -> bool:
        return self.history or self.pending_samples > 0 or self.replay_samples > 0


class ErasureWhileTraining(RecstreamError):
    """An erasure was asked for while an experience trains: erase between experiences."""


def erase_user(learner, user_id: str) -> Erasure:
    """Remove every trace of ``user_id`` from ``learner`` (a ``ContinualRecommender``).

    Must run between experiences: training reads the histories and fills the reservoir.
    """
    with learner.lock:
        if learner.training_in_flight:
            raise ErasureWhileTraining(f"cannot erase user {user_id!r} while an experience trains or a checkpoint "
                                       "is prepared: erase between experiences")
        slot = learner.users.remove(user_id)
        pending = learner.drop_pending(slot) if slot is not None else 0
        if learner.rows is not None:  # with a collective: events waiting for their item's row
            pending += learner.rows.drop_user(user_id)
        replay = learner.parts.replay
        in_replay = replay.storage_policy.remove_owner(owner_tag(user_id)) if replay is not None else 0
    return Erasure(user_id, slot is not None, pending, in_replay)
