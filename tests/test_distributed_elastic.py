"""Elastic membership: ``torchrun --nnodes=1:2`` with the c10d rendezvous, two agents (two nodes)
on the embedded broker. One agent runs alone; a second joins, and the group re-forms as two ranks
from the first's model; the second is SIGKILLed, and the group re-forms as one; a third joins with
the second's old folder (what a pod scaled away and back finds), and is then asked to stop (a pod
scaled away): the group drains together, it leaves, and the first restarts alone. Nothing is lost
or applied twice on the way, and ``model_version`` never goes back.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
import uuid
from collections import defaultdict

import pytest

from learners.synthetic import SyntheticWorld
from stream.kafka.broker import log_end_offsets, read_topic
from worker_harness import (WorkerProcess, changelog_histories, committed_offsets, free_port, make_topics,
                            produce_events, produce_items, summed)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_FAST = dict(experience_size=128, max_experience_wait_s=1, checkpoint_interval_s=3, torch_threads=1)


def _agent(broker, topics, tmp_path, rdzv_port: int, name: str) -> WorkerProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{rdzv_port}", f"--rdzv-id={topics.group}",
               "--rdzv-conf=last_call_timeout=2", "--monitor-interval=1", "--max-restarts=3",
               "-m", "stream.cli", "worker", "--distributed", "true"]
    return WorkerProcess(broker.bootstrap, topics, tmp_path / "state", tmp_path / f"{name}.log", command=command,
                         **_FAST)


def _trained(count: int):
    return lambda m: m.get("recstream_events_consumed_total", 0) >= count and m.get("recstream_pending_events", 1) == 0


def test_a_node_that_joins_and_one_that_dies_re_form_the_group(broker, unique_topic, tmp_path, monkeypatch):
    # The agents' shared rendezvous store does not re-form a grown group (docs/operating.md).
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    topics = make_topics(broker.bootstrap, unique_topic, partitions=4)
    world = SyntheticWorld(n_items=60, n_users=30, seed=11)
    produce_items(broker.bootstrap, topics.items, world.items())
    events = list(world.events(1000, id_prefix=f"el-{uuid.uuid4().hex[:6]}"))
    rdzv_port = free_port()
    first = _agent(broker, topics, tmp_path, rdzv_port, "first")
    second = third = None
    try:
        first.wait_for(lambda m: m.get("recstream_partitions_assigned") == 4, 120, "the first node alone")
        produce_events(broker.bootstrap, topics.events, events[:300])
        first.wait_for(_trained(300), 120, "the first 300 events trained")

        second = _agent(broker, topics, tmp_path, rdzv_port, "second")

        def both() -> list[dict[str, float]]:  # each agent serves its rank's metrics
            return [first.metrics(), second.metrics()]

        _until(lambda: all(m.get("recstream_partitions_assigned") == 2 for m in both()), 150, "two nodes", both)
        produce_events(broker.bootstrap, topics.events, events[300:600])
        _until(lambda: summed(both(), "recstream_events_consumed_total") >= 300
               and all(m.get("recstream_pending_events", 1) == 0 for m in both()), 120, "300 more trained", both)
        two = both()
        assert all(m.get("recstream_events_consumed_total", 0) > 0 for m in two), two  # each its own partitions

        second.kill()
        first.wait_for(lambda m: m.get("recstream_partitions_assigned") == 4, 150, "the first node alone again")
        produce_events(broker.bootstrap, topics.events, events[600:900])
        first.wait_for(_trained(300), 120, "300 more trained")  # its counters started again at 0

        first_log_before_third = len(first.log_path.read_text(errors="replace"))
        third = _agent(broker, topics, tmp_path, rdzv_port, "third")

        def again() -> list[dict[str, float]]:
            return [first.metrics(), third.metrics()]

        _until(lambda: all(m.get("recstream_partitions_assigned") == 2 for m in again()), 150, "two nodes again",
               again)
        produce_events(broker.bootstrap, topics.events, events[900:])
        _until(lambda: summed(again(), "recstream_events_consumed_total") >= 100
               and all(m.get("recstream_pending_events", 1) == 0 for m in again()), 120, "the last 100 trained", again)
        # The third node is asked to stop: the group drains together, the third leaves, and the first
        # restarts its rank to re-form alone (the third's torchrun then waits in its exit barrier). Its
        # partitions are not waited for: the embedded broker can keep the leaver as the group's leader
        # when every member has left cleanly (tests/test_distributed_integration.py).
        starts = first.log_path.read_text(errors="replace").count("rank 0 of 1 (gloo)")
        third.proc.send_signal(signal.SIGTERM)
        _until(lambda: first.log_path.read_text(errors="replace").count("rank 0 of 1 (gloo)") > starts, 150,
               "the first node's rank restarted alone", again)
        third.kill()
        first.terminate(timeout_s=90)
    except BaseException:
        for agent in (first, second, third):
            if agent is not None:
                agent.kill()
        raise
    texts = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in ("first", "second", "third")}
    joined = texts["first"] + texts["second"]
    # The rendezvous gives rank 1 to either node, and rank 1's folder is the second's old one, older than
    # the group's model: whichever node holds it now starts from rank 0's.
    third_join = texts["first"][first_log_before_third:] + texts["third"]
    assert re.search(r"rank 1 holds only checkpoints the group's do not share", third_join), third_join[-4000:]
    assert re.search(r"rank 1 starts from rank 0's ckpt-", third_join), third_join[-4000:]
    assert "RanksDisagree" not in texts["third"] + texts["first"]
    # Asked to stop, it drained with the first, which then restarted to go on without it.
    assert "stopping: training what is pending" in texts["third"], texts["third"][-3000:]
    assert "another rank of the group was asked to stop and leaves" in texts["first"], texts["first"][-3000:]

    # The joining node started from the other's model: one rank joined a group of one, and the two
    # ranks started with the same weights.
    assert re.search(r"rank \d joins a group of 1", joined) and re.search(r"rank \d starts from rank \d's ckpt-",
                                                                           joined), joined[-4000:]
    digests = {name: re.findall(r"rank \d of 2: model v(\d+), weights sha256 (\w+), the same on every rank", text)
               for name, text in texts.items()}
    assert digests["second"] and digests["first"][0] == digests["second"][0], digests
    assert digests["third"] and digests["third"][0] in digests["first"], digests
    assert "RanksDisagree" not in joined and "weights differ across ranks" not in joined

    # Every partition committed to its end; every user's history is all their events, each once,
    # in order, whichever node held it; model_version never goes back on any key.
    ends = log_end_offsets(broker.bootstrap, topics.events)
    assert committed_offsets(broker.bootstrap, topics.group, topics.events, ends) == ends
    assert sum(ends.values()) == len(events)
    history: dict[str, list[str]] = defaultdict(list)
    for event in events:
        history[event.user_id].append(event.item_id)
    assert changelog_histories(broker.bootstrap, topics.changelog) == {u: tuple(h[-256:]) for u, h in history.items()}
    seen: dict[bytes, int] = defaultdict(int)
    for record in read_topic(broker.bootstrap, topics.vectors):
        if record.value is not None:
            version = json.loads(record.value)["payload"]["model_version"]
            assert version >= seen[record.key], (record.key, version, seen[record.key])
            seen[record.key] = version
    assert {key.decode()[5:] for key in seen if key.startswith(b"user:")} == {e.user_id for e in events}


def _until(predicate, timeout_s: float, what: str, metrics) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; last metrics {metrics()}")
