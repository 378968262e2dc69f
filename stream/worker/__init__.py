"""The long-running worker, composed of parts that each own their state (see ``loop.Worker``).

``Worker`` is imported on first use, so the light parts (``heap``, ``dedup``) import without the model.
"""

from __future__ import annotations

__all__ = ["Worker", "Totals", "learner_config"]


def __getattr__(name: str):
    if name == "Worker":
        from stream.worker.loop import Worker
        return Worker
    if name == "Totals":
        from stream.worker.totals import Totals
        return Totals
    if name == "learner_config":
        from stream.learner_setup import learner_config
        return learner_config
    raise AttributeError(f"module 'stream.worker' has no attribute {name!r}")
