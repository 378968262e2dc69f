"""Fuzzing the whole path a record takes: ingest -> the real learner and model -> publish.

Arbitrary bytes, arbitrary JSON objects and well-formed records with arbitrary
strings go into a worker that runs on the real learner (the shipped model, real
training) with a fake consumer and producer. Whatever comes in: nothing raises,
every record is applied or dead-lettered, every vector that goes out is valid
UTF-8 JSON with a finite unit vector, and the totals add up
(consumed = valid + dead-lettered + duplicates).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learners.learner import ContinualRecommender
from learners.records import BadRecord, parse_event
from stream.config import Settings
from stream.learner_setup import learner_config
from worker_fakes import TP0, FakeItems, consumer_record, item_record, make_worker, skip_checkpoint_files

pytestmark = pytest.mark.integration

EVENT_KEYS = ["event_id", "user_id", "item_id", "event_type", "ts"]
json_scalars = st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers() \
    | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
# Ids drawn from every code point, lone surrogates included, plus a few that repeat.
ids = st.text(max_size=10) | st.sampled_from(["u1", "u2", "i1", "i2", "caf\u00e9", " ", "\ud800"])


def _dumps(obj) -> bytes:
    # json.dumps writes lone surrogates as \ud800 escapes, exactly the poison that passed before.
    return json.dumps(obj, allow_nan=True).encode()


well_formed_events = st.builds(
    lambda event_id, user_id, item_id, event_type, ts: _dumps(
        {"event_id": event_id, "user_id": user_id, "item_id": item_id, "event_type": event_type, "ts": ts}),
    ids, ids, ids, st.sampled_from(["click", "favourite", "favorite", "purchase", "share"]),
    st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2**70, 2**70))
event_values = st.one_of(
    st.binary(max_size=80),
    st.dictionaries(st.sampled_from(EVENT_KEYS + ["x"]), json_values).map(_dumps),
    well_formed_events, well_formed_events)
item_values = st.one_of(
    st.binary(max_size=60),
    st.dictionaries(st.sampled_from(["item_id", "text", "x"]), json_values).map(_dumps),
    st.builds(lambda item_id, text: _dumps({"item_id": item_id, "text": text}), ids, st.text(max_size=40)))


@pytest.fixture(scope="module")
def learner():
    config = learner_config(Settings(device="cpu", batch_size=16,
                                     negatives=16, replay_size=64, replay_batch=4))
    return ContinualRecommender(config)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(events=st.lists(event_values, max_size=30), items=st.lists(item_values, max_size=6))
def test_every_record_is_applied_or_dead_lettered_and_every_vector_is_sound(learner, events, items):
    with tempfile.TemporaryDirectory() as state:
        worker, consumer, producer = make_worker(
            Path(state), [{TP0: [consumer_record(o, v) for o, v in enumerate(events)]}], learner=learner,
            experience_size=8)
        worker.consumers.items = FakeItems([item_record(o, v) for o, v in enumerate(items)])
        before = worker.totals.consumed
        worker.turn()
        worker.turn()
        skip_checkpoint_files(worker)
        worker.checkpointer.mark_dirty()
        assert worker.checkpoint()  # publishes and delivers everything first

    t = worker.totals
    assert t.consumed - before == len(events)
    assert t.consumed == t.valid + t.dead_lettered + t.duplicates
    bad_events = sum(isinstance(parse_event(v), BadRecord) for v in events)
    dead = [headers for topic, _, _, headers in producer.sent if topic == "events.dlq"]
    event_dead = [h for h in dead if dict(h)["source_topic"] == b"events"]
    assert len(event_dead) == t.dead_lettered == bad_events
    for topic, key, value, headers in producer.sent:
        if topic != "vectors":
            continue
        key.decode("utf-8")
        record = json.loads(value.decode("utf-8"))
        vector = record["vector"]
        assert all(math.isfinite(x) for x in vector)
        assert abs(math.sqrt(sum(x * x for x in vector)) - 1.0) < 1e-4
        assert key.decode() == f"{record['payload']['entity_type']}:{record['payload']['entity_id']}"
    for stage in ("events", "items", "user_vectors", "item_vectors"):  # validation caught every bad one
        assert worker.metrics.registry.get_sample_value("recstream_record_failures_total", {"stage": stage}) == 0
    if events:
        assert consumer.commits[-1][TP0].offset == len(events)
