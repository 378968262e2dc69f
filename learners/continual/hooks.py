"""A plugin that calls back into whoever drives the learner after every step.

The worker uses it to keep its Kafka consumer's membership alive while a long
experience trains; the learner itself knows nothing of what the callback does.
"""

from __future__ import annotations

from typing import Callable, Optional

from avalanche.training.plugins import SupervisedPlugin


class StepCallbackPlugin(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.callback: Optional[Callable[[], None]] = None

    def after_training_iteration(self, strategy, **kwargs):
        if self.callback is not None:
            self.callback()
