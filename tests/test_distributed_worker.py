"""``--distributed``: torchrun's environment, each rank's settings, and the error without torchrun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from learners.errors import ConfigError
from stream.config import Settings
from stream.distributed_setup import rank_of_env, rank_settings

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_rank_is_read_from_torchruns_environment():
    rank = rank_of_env(TORCHRUN)
    assert (rank.rank, rank.world_size, rank.local_rank) == (1, 2, 1)


def test_without_torchrun_the_error_says_how_to_launch():
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node") as info:
        rank_of_env({k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"})
    assert "MASTER_ADDR" in str(info.value)


def test_each_rank_has_its_own_state_dir_and_metrics_port(tmp_path):
    settings = Settings(bootstrap_servers="kafka:9092", state_dir=tmp_path, metrics_port=9108, distributed=True)
    mine = rank_settings(settings, rank_of_env(TORCHRUN))
    assert mine.state_dir == tmp_path / "rank-1" and mine.metrics_port == 9109
    assert not mine.background_training  # rounds' collectives on the loop thread
    with pytest.raises(ConfigError, match="bootstrap-servers"):
        rank_settings(Settings(distributed=True), rank_of_env(TORCHRUN))


def test_the_worker_command_refuses_distributed_without_torchrun(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k not in TORCHRUN}
    env.update({"RECSTREAM_DISTRIBUTED": "true", "RECSTREAM_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                "RECSTREAM_STATE_DIR": str(tmp_path), "RECSTREAM_METRICS_PORT": "0"})
    done = subprocess.run([sys.executable, "-m", "stream.cli", "worker"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "needs torchrun's environment" in done.stderr and "Traceback" not in done.stderr


class _OneRank:
    """``GroupTurns`` of a group of one: the turn is this rank's own flags."""

    publishes_items = True

    def __init__(self) -> None:
        self.turns = []

    def agree(self, **flags):
        from stream.worker.group_turns import GroupTurn

        self.turns.append(flags)
        return GroupTurn(**{name: bool(value) for name, value in flags.items()})

    def any(self, flag: bool) -> bool:
        return flag


def test_rows_are_agreed_but_nothing_trains_while_a_rank_waits_to_rejoin(tmp_path):
    """The checkpoint a rank takes before giving up its partitions must hold the events that waited
    for rows, so the round giving them rows still runs; training waits for the rejoin."""
    from worker_fakes import FakeLearner, event_bytes, make_worker

    from learners.records import parse_event

    class WaitingLearner(FakeLearner):
        rows_waiting = True
        agreed = 0

        def agree_rows(self):
            self.agreed += 1
            return []

    learner = WaitingLearner()
    learner.allow_training = True
    worker, _, _ = make_worker(tmp_path, learner=learner, experience_size=1)
    worker.group = _OneRank()
    learner.observe(parse_event(event_bytes(1)))
    rejoin = [True]
    worker.consumers.events.rejoin_pending = lambda: rejoin[0]

    worker._group_turn(checkpoint_due=False)  # noqa: SLF001 - one group turn, driven by hand
    assert learner.agreed == 1 and learner.pending == 1 and learner.model_version == 0
    assert worker.group.turns[-1]["rejoining"] and worker.group.turns[-1]["train"]

    rejoin[0] = False
    worker._group_turn(checkpoint_due=False)  # noqa: SLF001
    assert learner.agreed == 2 and learner.pending == 0 and learner.model_version == 1


def test_a_rank_that_must_go_back_alone_exits_for_the_group_to_restart_together(tmp_path):
    """Revoked mid-experience (or forced out of the group), one rank going back to its checkpoint
    alone would train on with weights behind the others': it exits instead, saying why."""
    from worker_fakes import make_worker

    from stream.worker.group_restore import RankMustRestart

    worker, _, _ = make_worker(tmp_path)
    worker.group = _OneRank()
    worker.checkpointer.request_rollback("partitions [('events', 0)] revoked mid-experience")
    with pytest.raises(RankMustRestart, match="revoked mid-experience.*--max-restarts"):
        worker.turn()


def test_every_rank_checkpoints_in_each_agreed_turn_and_numbers_it_alike(tmp_path):
    """A restart must find on every rank a checkpoint of the same turn: an agreed turn writes one
    even where nothing changed, and every checkpoint names the last agreed turn (those a rank
    takes alone in between too)."""
    from worker_fakes import TP0, consumer_record, event_bytes, make_worker

    from stream.worker.group_restore import GroupRewind

    worker, _, _ = make_worker(tmp_path, [{TP0: [consumer_record(0, event_bytes(1))]}])
    saved = []  # the fake learner has no files: keep each checkpoint's bookkeeping
    worker.checkpointer.store.prepare = lambda learner, extra: saved.append(extra)
    worker.checkpointer.store.write = lambda prepared, **_: None
    worker.checkpointer.rewind = GroupRewind({})

    assert worker.checkpointer.checkpoint(agreed=True)  # nothing applied yet: written all the same
    assert worker.checkpointer.checkpoint(agreed=True)
    worker.turn()  # an event applied
    assert worker.checkpointer.checkpoint()  # this rank alone, between two turns (as in a rebalance)
    assert worker.checkpointer.checkpoint()  # nothing changed since: nothing written
    assert [extra["group_turn"] for extra in saved] == [1, 2, 2]
    assert [extra["event_offsets"] for extra in saved][-1] == [[TP0[0], TP0[1], 1]]
