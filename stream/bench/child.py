"""The worker process of the freshness and memory runs: ``python -m stream.bench.child CONFIG``.

A production ``Worker`` (same class, same loop, same checkpoints as
``recstream worker``) in its own process, so the parent can measure it from
the outside -- resident memory by pid, vectors from the topic -- without its
own threads competing for this process's GIL. Two read-only recorders are
added, both constant-size:

* the exact value of every ``recstream_event_to_vector_seconds`` observation
  (1 ms histogram), to cross-check the parent's outside measurement;
* the wall-clock time each model version finished training (a plugin at
  ``after_training``), so the parent can time item republication.

CONFIG (JSON): ``settings`` (Settings fields), ``expect_items`` (catalogue
size that means "items loaded"), ``ready_path``, ``result_path``, and
optionally ``status_path`` + ``status_every_s`` (the bounded structures' sizes,
rewritten that often, for ``benchmarks/soak.py``). The
ready file appears once partitions are assigned and the catalogue is
loaded; SIGTERM stops the worker the normal way (drain, checkpoint, commit),
then the result JSON is written.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

from avalanche.training.plugins import SupervisedPlugin

from stream.bench.common import LatencyHistogram
from stream.config import Settings


class _UpdateClock(SupervisedPlugin):
    """model_version -> time.time() when its training finished (the model update)."""

    def __init__(self, learner) -> None:
        super().__init__()
        self.learner = learner
        self.finished: dict[int, float] = {}

    def after_training(self, strategy, **kwargs):
        # ContinualRecommender bumps model_version right after strategy.train returns.
        self.finished[int(self.learner.model_version) + 1] = time.time()


def _replay_len(learner) -> int:
    replay = learner.parts.replay
    return replay.storage_policy.filled if replay is not None else 0


def _sizes(app, settings) -> dict:
    """The bounded structures that grow until full: where RSS growth goes."""
    return {"dedup_ledger_ids": app.ingest.ledger_size, "dedup_window": settings.dedup_window,
            "replay_samples": _replay_len(app.learner), "replay_size": settings.replay_size,
            "pending": app.learner.pending, "users": len(app.learner.users), "max_users": settings.max_users,
            "history_length": settings.history_length, "catalogue": len(app.learner.catalogue),
            "model_version": int(app.learner.model_version)}


def _write_status(app, settings, config: dict) -> None:
    """Every ``status_every_s``: the sizes, read without the learner's lock (counts only, so a
    value one update old is fine), written atomically."""
    path = config["status_path"]
    while not app.lifecycle.stopping:
        try:
            status = {"time": time.time(), **_sizes(app, settings)}
        except RuntimeError:  # a dict resized under us: take the next one
            status = None
        if status is not None:
            with open(path + ".tmp", "w") as fh:
                json.dump(status, fh)
            os.replace(path + ".tmp", path)
        time.sleep(config.get("status_every_s", 10.0))


def _sample(registry, name: str, **labels):
    value = registry.get_sample_value(name, labels or None)
    return None if value is None else float(value)


def main(argv: list[str]) -> int:
    with open(argv[1]) as fh:
        config = json.load(fh)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "avalanche", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from stream.worker import Worker

    settings = Settings(**config["settings"])
    app = Worker(settings)
    exact = LatencyHistogram()
    observe = app.metrics.observe_event_to_vector

    def recorded(seconds):
        for value in seconds:
            exact.add(value)
        return observe(seconds)

    app.metrics.observe_event_to_vector = recorded
    clock = _UpdateClock(app.learner)
    app.learner.parts.strategy.plugins.append(clock)
    # [wall-clock start, seconds the learner was held, seconds of the write] of every checkpoint
    checkpoints: list[list[float]] = []
    write = app.checkpointer.store.write

    def timed_write(prepared, **options):
        t0 = time.time()
        try:
            return write(prepared, **options)
        finally:
            checkpoints.append([t0 - prepared.prepare_s, prepared.prepare_s, time.time() - t0])

    app.checkpointer.store.write = timed_write
    app.connect()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: app.stop())

    def announce_ready() -> None:
        while not app.lifecycle.stopping:
            if app.metrics.ready and len(app.learner.catalogue) >= config["expect_items"]:
                with open(config["ready_path"] + ".tmp", "w") as fh:
                    json.dump({"pid": os.getpid(), "time": time.time()}, fh)
                os.replace(config["ready_path"] + ".tmp", config["ready_path"])
                return
            time.sleep(0.1)

    threading.Thread(target=announce_ready, name="bench-ready", daemon=True).start()
    if config.get("status_path"):
        threading.Thread(target=_write_status, args=(app, settings, config), name="bench-status",
                         daemon=True).start()
    started = time.time()
    rc = app.run()
    registry = app.metrics.registry
    result = {
        "rc": rc, "seconds": time.time() - started,
        "event_to_vector_in_process": exact.summary(),
        "model_updates": {str(v): t for v, t in clock.finished.items()},
        "checkpoints": checkpoints,
        "totals": vars(app.totals),
        "model_version": int(app.learner.model_version),
        "users": len(app.learner.users), "catalogue": len(app.learner.catalogue),
        "sizes": _sizes(app, settings),
        "metrics": {
            "train_steps": _sample(registry, "recstream_train_steps_total"),
            "train_samples": _sample(registry, "recstream_train_samples_total"),
            "train_samples_shed": _sample(registry, "recstream_train_samples_shed_total"),
            "checkpoints": _sample(registry, "recstream_checkpoints_total"),
            "user_vectors": _sample(registry, "recstream_vectors_published_total", kind="user"),
            "item_vectors": _sample(registry, "recstream_vectors_published_total", kind="item"),
            "train_step_seconds_sum": _sample(registry, "recstream_train_step_seconds_sum"),
            "train_step_seconds_count": _sample(registry, "recstream_train_step_seconds_count"),
        },
    }
    with open(config["result_path"] + ".tmp", "w") as fh:
        json.dump(result, fh)
    os.replace(config["result_path"] + ".tmp", config["result_path"])
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
