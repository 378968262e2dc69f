"""The embedded default's synthetic stream (``recstream worker`` with no broker given)."""

from __future__ import annotations

import json

import pytest

from learners.synthetic import SyntheticWorld
from stream.config import Settings
from stream.demo import DemoFeeder, create_topics
from stream.kafka.broker import read_topic

pytestmark = pytest.mark.integration  # the real embedded broker


def test_each_demo_run_sends_new_event_ids(broker, unique_topic):
    """The embedded broker starts empty on every run: a restarted worker must see new events,
    not the last run's ids again (it would skip them all as duplicates)."""
    settings = Settings(bootstrap_servers=broker.bootstrap, events_topic=unique_topic("events"),
                        items_topic=unique_topic("items"), vectors_topic=unique_topic("vectors"),
                        dlq_topic=unique_topic("dlq"))
    create_topics(broker.bootstrap, settings)
    world = SyntheticWorld(n_items=20, n_users=5, seed=1)
    for _ in range(2):
        feeder = DemoFeeder(broker.bootstrap, settings, world, rate_per_s=10_000, total_events=30)
        feeder.run()  # in this thread: returns once all 30 are sent
    ids = [json.loads(record.value)["event_id"] for record in read_topic(broker.bootstrap, settings.events_topic)]
    assert len(ids) == 60 and len(set(ids)) == 60
