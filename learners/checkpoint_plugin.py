"""An Avalanche plugin that checkpoints the learner every N experiences.

The worker checkpoints on its own schedule (it must pair every checkpoint with
the Kafka offsets it covers), so this plugin is for strategy-only runs:
offline training, evaluation, and ``recstream bench``'s training figure, which
measures the strategy with every plugin the product uses switched on.

It saves in ``after_training``, after every ``after_training_exp`` hook has
run (EWC has folded its importances, replay has updated its buffer), so the
saved strategy state is complete. One caveat: ``ContinualRecommender`` bumps
``model_version`` and re-embeds the trained items only once
``strategy.train`` returns, so a checkpoint written here carries the weights
of version ``v + 1`` under the number ``v``; a learner restored from it
publishes that version number once more after its next experience.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

from avalanche.training.plugins import SupervisedPlugin

from learners.checkpoint import CheckpointStore

if TYPE_CHECKING:  # pragma: no cover
    from learners.learner import ContinualRecommender

log = logging.getLogger(__name__)


class CheckpointPlugin(SupervisedPlugin):
    """``CheckpointStore(state_dir).save(learner, extra())`` after every ``every``-th experience."""

    def __init__(self, store: CheckpointStore, learner: "ContinualRecommender", every: int = 10,
                 extra: Optional[Callable[[], dict]] = None) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be at least 1 (got {every})")
        self.store = store
        self.learner = learner
        self.every = int(every)
        self.extra = extra
        self.experiences = 0
        self.saves = 0
        self.seconds = 0.0  # time spent saving, for callers that account for it

    def after_training(self, strategy, **kwargs):
        self.experiences += 1
        if self.experiences % self.every:
            return
        started = time.perf_counter()
        self.store.save(self.learner, self.extra() if self.extra is not None else None)
        self.seconds += time.perf_counter() - started
        self.saves += 1
        log.debug("checkpoint after experience %d (%.2f s)", self.experiences, time.perf_counter() - started)

    @classmethod
    def attach(cls, learner: "ContinualRecommender", state_dir, every: int = 10,
               extra: Optional[Callable[[], dict]] = None, keep: int = 3) -> "CheckpointPlugin":
        """Build one and append it to the learner's strategy (it runs after the other plugins)."""
        plugin = cls(CheckpointStore(state_dir, keep=keep), learner, every, extra)
        learner.parts.strategy.plugins.append(plugin)
        return plugin
