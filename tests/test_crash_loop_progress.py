"""What keeps a worker that is killed over and over making progress: checkpoints every few
seconds while it is behind (unchanged files linked, not copied), item texts encoded in slices
between polls, and static group membership so a restart gets its partitions back at once."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import numpy as np
import pytest
from kafka.errors import FencedInstanceIdError

from fake_kafka import FakeConsumer
from learners.records import Item
from stream.config import Settings
from stream.kafka.clients import KafkaSource
from stream.kafka.errors import BrokerError
from worker_fakes import TP0, FakeItems, FakeLearner, consumer_record, event_bytes, item_record, make_worker, \
    skip_checkpoint_files


def _batches(n: int, size: int = 10) -> list[dict]:
    return [{TP0: [consumer_record(i, event_bytes(i)) for i in range(k * size, (k + 1) * size)]} for k in range(n)]


def test_while_events_wait_in_the_log_a_worker_checkpoints_every_catch_up_interval(tmp_path):
    worker, consumer, _ = make_worker(tmp_path, _batches(3), catch_up_checkpoint_s=0.05, first_checkpoint_s=1000)
    skip_checkpoint_files(worker)
    consumer.highwaters[TP0], consumer.positions[TP0] = 10_000, 10  # far behind the log end
    committed = []
    for _ in range(3):
        worker.turn()
        worker.checkpointer.collect(wait=True)
        committed.append(consumer.commits[-1][TP0].offset if consumer.commits else 0)
        time.sleep(0.1)
    assert committed[-1] >= 20 and committed == sorted(committed)  # commits follow the events applied


def test_once_caught_up_a_worker_checkpoints_at_the_interval_only(tmp_path):
    worker, consumer, _ = make_worker(tmp_path, _batches(3), catch_up_checkpoint_s=0.05, first_checkpoint_s=1000)
    skip_checkpoint_files(worker)
    consumer.highwaters[TP0], consumer.positions[TP0] = 30, 30  # nothing left to read
    for _ in range(3):
        worker.turn()
        time.sleep(0.1)
    worker.checkpointer.collect(wait=True)
    assert consumer.commits == []  # checkpoint_interval_s is 1000 s here


def _text(offset: int) -> bytes:
    return json.dumps({"item_id": f"i{offset}", "text": f"film {offset}"}).encode()


def test_item_texts_arriving_at_once_are_encoded_in_slices_between_polls(tmp_path):
    worker, consumer, _ = make_worker(tmp_path, _batches(3), items_per_turn=64)
    encoded: list[list[str]] = []
    worker.learner.add_items = lambda items: encoded.append([i.item_id for i in items]) or []
    worker.consumers.items = FakeItems([item_record(o, _text(o)) for o in range(150)])
    polls = []
    for _ in range(3):
        worker.turn()
        polls.append(consumer.poll_calls)
    assert [len(batch) for batch in encoded] == [64, 64, 22]
    assert polls == [1, 2, 3]  # events were read between the slices
    assert worker.items.offsets == {0: 150} and worker.totals.items == 150


def test_checkpoint_files_that_did_not_change_are_hard_links_to_the_previous_ones(tmp_path):
    from learners.checkpoint import CheckpointStore
    from learners.learner import ContinualRecommender, LearnerConfig
    from stream.config import default_model_path

    learner = ContinualRecommender(LearnerConfig(model_path=default_model_path(), device="cpu", replay_size=100))
    learner.add_items([Item(f"i{n}", f"film number {n}") for n in range(30)])
    store = CheckpointStore(tmp_path / "state")
    first = store.save(learner, {"n": 1})
    second = store.save(learner, {"n": 2})  # the catalogue did not change; extra.json did
    assert os.stat(first / "features.safetensors").st_ino == os.stat(second / "features.safetensors").st_ino
    assert os.stat(first / "extra.json").st_ino != os.stat(second / "extra.json").st_ino
    assert store.last_linked_bytes > 0

    # A restarted worker's first checkpoint links the restored one's unchanged files too.
    restarted = CheckpointStore(tmp_path / "state")
    again = ContinualRecommender(LearnerConfig(model_path=default_model_path(), device="cpu", replay_size=100))
    assert restarted.load_latest(again) == {"n": 2}
    third = restarted.save(again, {"n": 3})
    assert os.stat(second / "features.safetensors").st_ino == os.stat(third / "features.safetensors").st_ino
    assert os.stat(second / "model" / "model-frozen.safetensors").st_ino == \
        os.stat(third / "model" / "model-frozen.safetensors").st_ino

    # Pruning an older checkpoint leaves the newer one whole.
    for path in (first, second):
        for entry in sorted(path.rglob("*"), reverse=True):
            entry.unlink() if entry.is_file() else entry.rmdir()
        path.rmdir()
    assert CheckpointStore(tmp_path / "state").load_latest(again) == {"n": 3}


def test_static_membership_is_for_the_group_member_only(tmp_path):
    settings = Settings(bootstrap_servers="a:1", group_instance_id="recstream-0")
    assert settings.consumer_kwargs()["group_instance_id"] == "recstream-0"
    reader = settings.reader_kwargs("items")
    assert reader["group_id"] is None and "group_instance_id" not in reader
    assert reader["client_id"] == "recstream-worker-items"
    assert "group_instance_id" not in Settings(bootstrap_servers="a:1").consumer_kwargs()  # dynamic by default
    assert "group_instance_id" not in Settings(bootstrap_servers="a:1", group_instance_id="").consumer_kwargs()


def test_the_automatic_instance_id_is_stable_per_state_dir_and_differs_between_them(tmp_path):
    def auto(folder: str):
        return Settings(bootstrap_servers="a:1", state_dir=tmp_path / folder, group_instance_id="auto").instance_id()

    one = auto("a")
    assert one == auto("a")  # a restart
    assert one != auto("b")  # another worker
    assert re.fullmatch(r"[A-Za-z0-9._-]+", one)


def test_a_fenced_worker_stops_with_what_to_do():
    consumer = FakeConsumer([FencedInstanceIdError(("recstream", "host-1234"))])
    with pytest.raises(BrokerError, match="--state-dir"):
        KafkaSource(consumer, sleep=lambda s: None).next_batch()


class _DepthLock:
    """A reentrant lock that says whether it is held (the learner's lock, observed)."""

    def __init__(self):
        self._lock, self.depth = threading.RLock(), 0

    def __enter__(self):
        self._lock.acquire()
        self.depth += 1

    def __exit__(self, *exc_info):
        self.depth -= 1
        self._lock.release()


def test_vectors_are_handed_to_the_producer_under_the_learners_lock(tmp_path):
    """Read a version, let go of the lock, send later: the trainer's newer vectors could go out
    first and model_version would step back in the vectors topic. Sends happen under the lock."""
    learner = FakeLearner()
    learner.lock = _DepthLock()
    learner.allow_training = True
    learner.items_to_publish = lambda min_change=0.0: (["i1"], np.ones((1, 4), np.float32) / 2)
    worker, _, producer = make_worker(tmp_path, _batches(1), learner=learner, experience_size=5)
    held: list[tuple[bytes, int]] = []
    send = producer.send
    producer.send = lambda topic, key=None, value=None, headers=None: (
        held.append((key, learner.lock.depth)), send(topic, key, value, headers))[1]
    worker.turn()  # applies the events and trains (inline), which publishes i1
    time.sleep(0.06)
    worker.turn()  # the user publish window is over
    assert {key for key, _ in held} >= {b"user:u0", b"item:i1"}
    assert all(depth >= 1 for key, depth in held if key.startswith((b"user:", b"item:"))), held


def test_the_first_events_of_an_assignment_are_checkpointed_before_training_goes_on(tmp_path):
    learner = FakeLearner()
    learner.allow_training = True
    worker, consumer, _ = make_worker(tmp_path, _batches(2), learner=learner, experience_size=5,
                                      first_checkpoint_s=1000)
    skip_checkpoint_files(worker)
    consumer.positions[TP0] = 0  # read from its start; no highwater yet: not behind, no catch-up cadence
    worker.membership.on_assigned([("events", 0)])
    worker.turn()  # held until taken over: where it is read from
    worker.turn()  # the assignment's first events: a checkpoint now, no experience before it
    assert learner.model_version == 0
    worker.checkpointer.collect(wait=True)
    assert consumer.commits[-1][TP0].offset == 10
    worker.turn()  # from here training goes on, checkpoints at the interval
    assert learner.model_version >= 1
