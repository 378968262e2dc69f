"""The embedded default: a local broker, a synthetic stream, and the worker on it."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from kafka import KafkaProducer

from learners.records import event_to_json, item_to_json
from learners.synthetic import SyntheticWorld
from stream.kafka.broker import EmbeddedBroker, ensure_topics

log = logging.getLogger(__name__)


def create_topics(bootstrap: str, settings, partitions: int = 3) -> None:
    ensure_topics(bootstrap, {settings.events_topic: partitions, settings.items_topic: 1,
                              settings.vectors_topic: partitions, settings.dlq_topic: 1, settings.forget_topic: 1,
                              settings.changelog_topic: partitions},
                  compacted={settings.items_topic, settings.vectors_topic, settings.changelog_topic})


class DemoFeeder(threading.Thread):
    """Publishes the synthetic catalogue, then events at a steady rate, until stopped."""

    def __init__(self, bootstrap: str, settings, world: SyntheticWorld, rate_per_s: float = 200.0,
                 total_events: int = 1_000_000) -> None:
        super().__init__(name="demo-feeder", daemon=True)
        # Event ids unique to this run: the embedded broker starts empty every time, and a
        # restarted worker would take the same ids again for duplicates and skip them all.
        self.id_prefix = f"demo-{uuid.uuid4().hex[:8]}"
        # Batches as the worker's producer does: the embedded broker's cost grows with stored batches.
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=settings.producer_linger_ms)
        self._settings, self._world = settings, world
        self._rate, self._total = rate_per_s, total_events
        self._stopped = threading.Event()
        self.sent = 0

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        s = self._settings
        for item in self._world.items():
            self._producer.send(s.items_topic, key=item.item_id.encode(), value=item_to_json(item))
        self._producer.flush()
        started = time.monotonic()
        for event in self._world.events(self._total, start_ts=time.time(), id_prefix=self.id_prefix):
            if self._stopped.is_set():
                break
            self._producer.send(s.events_topic, key=event.user_id.encode(), value=event_to_json(event))
            self.sent += 1
            ahead = self.sent / self._rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        self._producer.flush()
        self._producer.close()


def banner(settings) -> str:
    """What a newcomer needs to look at the demo: where its broker is, its topics, the ids, a query."""
    topk = f"recstream topk --user user-0 --bootstrap-servers {settings.bootstrap_servers}"
    if settings.vectors_topic != "vectors":
        topk += f" --vectors-topic {settings.vectors_topic}"
    return "\n".join((
        f"recstream demo: an embedded Kafka broker on {settings.bootstrap_servers} (new and empty every start),",
        f"  fed {settings.demo_rate:g} synthetic events/s of users user-0..user-{settings.demo_users - 1} "
        f"on items item-0..item-{settings.demo_items - 1}.",
        f"  topics: {settings.events_topic} and {settings.items_topic} in, {settings.vectors_topic} out, "
        f"bad records to {settings.dlq_topic}",
        f"  a user's top 10 items, once their first vector is out:  {topk}",
        (f"  metrics: http://localhost:{settings.metrics_port}/metrics; " if settings.metrics_port else "  ")
        + "Ctrl-C stops",
    ))


def start_embedded(settings) -> tuple[EmbeddedBroker, str]:
    broker = EmbeddedBroker()
    broker.start()
    create_topics(broker.bootstrap, settings)
    log.info("embedded broker (tansu) on %s; topics created", broker.bootstrap)
    return broker, broker.bootstrap
