"""The right to be forgotten on real parts: embedded broker, real worker process, its checkpoints."""

from __future__ import annotations

import time
import uuid

import pytest
from click.testing import CliRunner

from learners.checkpoint import CheckpointStore
from learners.learner import ContinualRecommender
from learners.synthetic import SyntheticWorld
from learners.state.users import owner_tag
from stream.cli import main
from stream.config import Settings
from stream.kafka.broker import read_topic
from stream.learner_setup import learner_config
from stream.vector_index import VectorIndex
from worker_harness import WorkerProcess, make_topics, produce_events, produce_items

pytestmark = pytest.mark.integration

GONE = "forget-me-5731"
LEARNER = {"experience_size": 128, "batch_size": 32, "negatives": 16, "replay_size": 256, "replay_batch": 16}


def _files_holding(state_dir, needles: list[bytes]) -> list[str]:
    """Files under ``state_dir`` holding any of ``needles``; a running worker prunes checkpoints
    meanwhile, so a walk that finds a file or folder gone starts again."""
    for _ in range(20):
        try:
            return [str(path) for path in state_dir.rglob("*") if path.is_file()
                    and any(needle in path.read_bytes() for needle in needles)]
        except FileNotFoundError:
            continue
    raise AssertionError(f"{state_dir} kept changing under the walk")


def test_a_forgotten_user_leaves_no_trace_in_checkpoints_state_or_vectors(broker, unique_topic, tmp_path):
    topics = make_topics(broker.bootstrap, unique_topic)
    world = SyntheticWorld(n_items=40, n_users=8, seed=5)
    events = [e._replace(user_id=GONE) if e.user_id == "user-3" else e
              for e in world.events(300, id_prefix=f"fg-{uuid.uuid4().hex[:6]}")]
    assert sum(e.user_id == GONE for e in events) > 10
    produce_items(broker.bootstrap, topics.items, world.items())
    produce_events(broker.bootstrap, topics.events, events)
    state = tmp_path / "state"
    settings = {**LEARNER, "checkpoint_interval_s": 3, "max_experience_wait_s": 1}

    worker = WorkerProcess(broker.bootstrap, topics, state, tmp_path / "worker.log", **settings)
    try:
        worker.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= len(events)
                        and m.get("recstream_pending_events", 1) == 0
                        and m.get("recstream_checkpoints_total", 0) >= 2, 300, "events trained and checkpointed")
        tag = owner_tag(GONE).to_bytes(8, "little", signed=True)
        assert _files_holding(state, [GONE.encode(), tag]), "the user is in the checkpoints before the request"
        before = worker.metrics()["recstream_checkpoints_total"]
        said = CliRunner().invoke(main, ["forget", "--user", GONE, "--bootstrap-servers", broker.bootstrap,
                                         "--forget-topic", topics.forget])
        assert said.exit_code == 0 and said.output.startswith(f"forget request for user {GONE!r} written to"), said.output
        worker.wait_for(lambda m: m.get("recstream_users_erased_total", 0) == 1
                        and m.get("recstream_checkpoints_total", 0) > before, 120, "the erasure checkpointed")
        # The checkpoint counted may be one whose snapshot came before the erasure; the one after it
        # follows at once, and then the older ones go.
        deadline = time.monotonic() + 60
        while _files_holding(state, [GONE.encode(), tag]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _files_holding(state, [GONE.encode(), tag]) == []  # older checkpoints removed too
        code = worker.terminate()
    except BaseException:
        worker.kill()
        raise
    assert code == 0, worker.tail()

    # A restart resumes from the checkpoint and does not apply the request again.
    later = [e for e in world.events(60, id_prefix=f"fg2-{uuid.uuid4().hex[:6]}") if e.user_id != "user-3"]
    produce_events(broker.bootstrap, topics.events, later)
    again = WorkerProcess(broker.bootstrap, topics, state, tmp_path / "again.log", **settings)
    try:
        m = again.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= len(later)
                           and m.get("recstream_pending_events", 1) == 0, 300, "the restarted worker caught up")
        assert m.get("recstream_users_erased_total", 0) == 0
        code = again.terminate()
    except BaseException:
        again.kill()
        raise
    assert code == 0, again.tail()
    assert _files_holding(state, [GONE.encode(), tag]) == []

    # The newest checkpoint, restored into a learner: no history, no replay sample of the user.
    learner = ContinualRecommender(learner_config(Settings(bootstrap_servers="127.0.0.1:1", device="cpu", **LEARNER)))
    assert CheckpointStore(state).load_latest(learner) is not None
    assert GONE not in learner.users and len(learner.users) == 7
    assert owner_tag(GONE) not in learner.parts.replay.storage_policy.owners().tolist()
    assert len(learner.parts.replay.storage_policy.owners()) > 0

    # A fresh read of the vectors topic: the tombstone deletes the user's vector, the others stay.
    index = VectorIndex()
    index.apply_records(read_topic(broker.bootstrap, topics.vectors))
    assert index.user_vector(GONE) is None
    assert len(index.user_ids()) == 7 and index.topk("user-0", k=3)
