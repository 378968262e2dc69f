"""The whole path on real parts: embedded broker, real default model, real worker process."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from learners.synthetic import SyntheticWorld
from stream.kafka.broker import log_end_offsets, read_topic
from worker_harness import WorkerProcess, committed_offsets, make_topics, produce, produce_events, produce_items

pytestmark = pytest.mark.integration

MALFORMED = [
    b"not json at all",
    b'{"event_id": "m1", "user_id": "u", "item_id": "i", "event_type": "click"}',  # no ts
    b'{"event_id": "m2", "user_id": "", "item_id": "i", "event_type": "click", "ts": 1.0}',  # empty id
    b'{"event_id": "m3", "user_id": "u", "item_id": "i", "event_type": "share", "ts": 1.0}',  # unknown type
    b'{"event_id": "m4", "user_id": "u", "item_id": "i", "event_type": "click", "ts": NaN}',  # non-finite
    b'{"event_id": 5, "user_id": "u", "item_id": "i", "event_type": "click", "ts": 1.0}',  # wrong type
    b"\xff\xfe invalid utf-8",
    b"[1, 2, 3]",
    # Valid JSON that UTF-8 cannot carry: once applied, it made publishing fail on every restart.
    b'{"event_id": "m5", "user_id": "\\ud800", "item_id": "1", "event_type": "click", "ts": 1.0}',
]


def test_worker_end_to_end(broker, unique_topic, tmp_path):
    topics = make_topics(broker.bootstrap, unique_topic)
    world = SyntheticWorld(n_items=120, n_users=60, seed=3)
    items = world.items()
    described = items[:100]  # 20 items are only ever named by events: no text arrives for them
    events = list(world.events(2500, id_prefix=f"it-{uuid.uuid4().hex[:6]}"))
    produce_items(broker.bootstrap, topics.items, described)
    produce_events(broker.bootstrap, topics.events, events[:1500])
    produce(broker.bootstrap, topics.events, [(b"bad", m) for m in MALFORMED])
    produce_events(broker.bootstrap, topics.events, events[1500:] + events[:50])  # 50 duplicate deliveries

    total = len(events) + len(MALFORMED) + 50
    worker = WorkerProcess(broker.bootstrap, topics, tmp_path / "state", tmp_path / "worker.log",
                           experience_size=512, checkpoint_interval_s=5, batch_size=64, negatives=64)
    try:
        worker.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= total
                        and m.get("recstream_pending_events", 1) == 0
                        and m.get("recstream_model_version", 0) >= 2, 300, "all events consumed and trained")
        final = worker.metrics()
        code = worker.terminate()
    except BaseException:
        worker.kill()
        raise
    assert code == 0, worker.tail()

    assert final["recstream_events_valid_total"] == len(events)
    assert final["recstream_events_duplicate_total"] == 50
    assert final["recstream_events_dead_lettered_total"] == len(MALFORMED)

    # The dead-letter topic holds exactly the malformed records, original bytes, with a reason.
    dead = read_topic(broker.bootstrap, topics.dlq)
    assert sorted(r.value for r in dead) == sorted(MALFORMED)
    assert all(dict(r.headers).get("reason") for r in dead)

    # Every user and every item with events has a vector in the contract's shape.
    latest: dict[str, dict] = {}
    for record in read_topic(broker.bootstrap, topics.vectors):
        value = json.loads(record.value)
        latest[record.key.decode()] = value
    users = {e.user_id for e in events}
    item_ids = {e.item_id for e in events} | {i.item_id for i in described}
    assert {k[5:] for k in latest if k.startswith("user:")} == users
    assert {k[5:] for k in latest if k.startswith("item:")} >= item_ids
    versions = set()
    for key, value in latest.items():
        kind, entity = key.split(":", 1)
        assert value["collection_name"] == {"user": "users", "item": "items"}[kind]
        assert value["id"] == str(uuid.uuid5(uuid.NAMESPACE_URL, f"{kind}:{entity}"))
        assert value["payload"]["entity_type"] == kind and value["payload"]["entity_id"] == entity
        assert abs(np.linalg.norm(value["vector"]) - 1.0) < 1e-4
        versions.add(value["payload"]["model_version"])
    assert max(versions) >= 2  # the model version advanced and vectors carry it

    # After SIGTERM the group's committed offsets are at the end of the events log.
    ends = log_end_offsets(broker.bootstrap, topics.events)
    committed = committed_offsets(broker.bootstrap, topics.group, topics.events, ends)
    assert committed == ends
    assert sum(ends.values()) == total

    # The same state folder given to a worker of another group and other topics: it refuses the
    # checkpoint (whose offsets belong to these topics) and says what to do.
    other = make_topics(broker.bootstrap, unique_topic)
    stranger = WorkerProcess(broker.bootstrap, other, tmp_path / "state", tmp_path / "stranger.log")
    try:
        code = stranger.proc.wait(timeout=120)
    except BaseException:
        stranger.kill()
        raise
    stranger._log.close()
    log_text = (tmp_path / "stranger.log").read_text()
    assert code == 1, log_text
    assert "belongs to another stream" in log_text and "--state-dir" in log_text, log_text
    assert "Traceback" not in log_text
