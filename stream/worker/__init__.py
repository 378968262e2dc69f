"""The long-running worker, composed of parts that each own their state (see ``loop.Worker``)."""

from stream.learner_setup import learner_config
from stream.worker.loop import Worker
from stream.worker.totals import Totals

__all__ = ["Worker", "Totals", "learner_config"]
