"""``CheckpointPlugin``: training waits for the prepare only; writes run beside it, in order,
and a failed write is raised, not lost. A fake store stands in for the real one."""

from __future__ import annotations

import threading

import pytest

from learners.continual.checkpoint_plugin import CheckpointPlugin


class _Store:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.gate = threading.Event()
        self.prepared: list[int] = []
        self.written: list[int] = []

    def prepare(self, learner, extra):
        self.prepared.append(learner.model_version)
        return learner.model_version

    def write(self, prepared):
        self.gate.wait(5)
        if self.fail:
            raise OSError("disk full")
        self.written.append(prepared)
        return f"ckpt-{prepared}"


class _Learner:
    model_version = 0


def test_saves_every_n_experiences_and_trains_on_while_the_write_runs():
    store, learner = _Store(), _Learner()
    plugin = CheckpointPlugin(store, learner, every=2)
    for version in range(3):
        learner.model_version = version
        plugin.after_training(None)
    assert store.prepared == [1] and store.written == []  # prepared, still being written
    assert plugin.saves == 1
    store.gate.set()
    assert plugin.close() == "ckpt-1" and store.written == [1]


def test_the_next_save_waits_for_the_previous_write_and_raises_its_failure():
    store, learner = _Store(fail=True), _Learner()
    plugin = CheckpointPlugin(store, learner, every=1)
    plugin.after_training(None)
    store.gate.set()
    with pytest.raises(OSError, match="disk full"):
        plugin.after_training(None)
    store.fail = False
    plugin.after_training(None)  # the failure was reported once; saving goes on
    assert plugin.close() == "ckpt-0" and store.written == [0]
