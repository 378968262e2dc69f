"""An Avalanche plugin that checkpoints the learner every N experiences.

The worker checkpoints on its own schedule (it must pair every checkpoint with
the Kafka offsets it covers), so this plugin is for strategy-only runs:
offline training, evaluation, and ``recstream bench``'s training figure, which
measures the strategy with every plugin the product uses switched on.

It saves in ``after_training``, after every ``after_training_exp`` hook has
run (EWC has folded its importances, replay has updated its buffer), so the
saved strategy state is complete. Only ``CheckpointStore.prepare`` (the state
to bytes, in memory) holds training up; the disk half
(``CheckpointStore.write``: writing, fsync, hashing, the commit) runs on a
thread of the plugin's own while the next experiences train, one write at a
time: a save waits for the previous write to end, and a write that failed
raises there. ``wait()`` returns once the last one is durable.

One caveat: ``ContinualRecommender`` bumps ``model_version`` and re-embeds the
trained items only once ``strategy.train`` returns, so a checkpoint written
here carries the weights of version ``v + 1`` under the number ``v``; a
learner restored from it publishes that version number once more after its
next experience.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
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
        self.seconds = 0.0  # time training was held up by saves, for callers that account for it
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recstream-checkpoint")
        self._last: Optional[Future] = None

    def after_training(self, strategy, **kwargs):
        self.experiences += 1
        if self.experiences % self.every:
            return
        started = time.perf_counter()
        last, self._last = self._last, None
        if last is not None:
            last.result()  # one write in flight at most; a failed one raises here
        prepared = self.store.prepare(self.learner, self.extra() if self.extra is not None else None)
        self._last = self._writer.submit(self.store.write, prepared)  # one thread: written in order
        held = time.perf_counter() - started
        self.seconds += held
        self.saves += 1
        log.debug("checkpoint after experience %d: training held %.3f s", self.experiences, held)

    def wait(self) -> Optional[Path]:
        """The last checkpoint's folder once it is durable (None before the first save); raises
        what its write raised."""
        return self._last.result() if self._last is not None else None

    def close(self) -> Optional[Path]:
        """``wait()``, then stop the writer thread."""
        try:
            return self.wait()
        finally:
            self._writer.shutdown(wait=True)

    @classmethod
    def attach(cls, learner: "ContinualRecommender", state_dir, every: int = 10,
               extra: Optional[Callable[[], dict]] = None, keep: int = 3) -> "CheckpointPlugin":
        """Build one and append it to the learner's strategy (it runs after the other plugins)."""
        plugin = cls(CheckpointStore(state_dir, keep=keep), learner, every, extra)
        learner.parts.strategy.plugins.append(plugin)
        return plugin
