"""Small fakes for driving ``stream.worker.Worker`` turn by turn without a broker or a model."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import numpy as np
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from learners.learner import LearnReport
from learners.state.stream_state import StreamState
from stream.config import Settings
from stream.kafka.clients import KafkaSource
from stream.metrics import WorkerMetrics
from stream.worker import Worker
from fake_kafka import FakeConsumer

TP0 = TopicPartition("events", 0)


def event_bytes(i: int) -> bytes:
    return json.dumps({"event_id": f"e{i}", "user_id": f"u{i % 7}", "item_id": f"i{i % 5}",
                       "event_type": "click", "ts": 1.0 + i}).encode()


def consumer_record(offset: int, value: bytes, partition: int = 0):
    return SimpleNamespace(topic="events", partition=partition, offset=offset, key=b"k", value=value,
                           timestamp=1000 + offset, headers=[])


def item_record(offset: int, value: bytes):
    return SimpleNamespace(topic="items", partition=0, offset=offset, key=b"i", value=value,
                           timestamp_ms=0, headers=[])


class FakeProducer:
    """Resolves every send at flush; ``fail_next`` sends fail once, ``refuse`` makes send() raise."""

    def __init__(self):
        self.sent = []
        self.futures = []
        self.fail_next = 0
        self.refuse = False
        self.send_calls = 0

    def send(self, topic, key=None, value=None, headers=None):
        self.send_calls += 1
        if self.refuse:
            raise KafkaTimeoutError("no metadata")
        future = Future()
        fail = self.fail_next > 0
        self.fail_next -= fail
        self.futures.append((future, fail, (topic, key, value, headers)))
        return future

    def flush(self, timeout=None):
        futures, self.futures = self.futures, []
        for n, (future, fail, record) in enumerate(futures):
            if fail:
                future.failure(KafkaTimeoutError("expired"))
            else:
                self.sent.append(record)
                future.success(SimpleNamespace(partition=0, offset=len(self.sent) - 1))

    def close(self, timeout=None):
        pass


class FakeItems:
    """The items topic: hands out the records it is given, once, at most ``max_records`` a call."""

    def __init__(self, records=()):
        self.offsets: dict = {}
        self.records = list(records)

    def next_batch(self, timeout_ms=0, max_records=500):
        records, self.records = self.records[:max_records], self.records[max_records:]
        for record in records:
            self.offsets[record.partition] = record.offset + 1
        return records

    def restart_from(self, start_offsets):
        self.offsets = dict(start_offsets)

    def close(self):
        pass


class _StateDict(dict):
    def state(self):
        return {"ids": list(self)}

    def remove(self, user_id):
        """As ``UserHistories.remove``: the user's "slot" (here the id itself), None if not held."""
        return user_id if self.pop(user_id, None) is not None else None


class FakeLearner:
    """The verbs the worker loop uses; ``learn`` trains only once ``allow_training`` is set."""

    def __init__(self):
        self.model_version = 0
        self.observed = []  # events observed and not trained on yet, in order
        self.lock = threading.RLock()
        self.users, self.catalogue = _StateDict(), _StateDict()
        self.catalogue.ids = []
        self.allow_training = False
        self.training_in_flight = False  # set by a checkpoint snapshot (stream/worker/checkpoint_writer.py)
        self.parts = SimpleNamespace(replay=None)  # no replay reservoir (learners.state.erasure reads it)
        self.rows = None  # no collective: nothing waits for catalogue rows (learners.state.erasure reads it)

    def snapshot(self):
        """No samples to save: checkpoints of a fake keep the worker's bookkeeping only."""
        return StreamState(self.model_version, 0, [], np.zeros((0, 4), np.float32), 0, 0)

    def item_vectors(self, item_ids=None):
        return np.zeros((0, 4), np.float32)

    @property
    def pending(self):
        return len(self.observed)

    def observe(self, event):
        self.observed.append(event)
        self.users[event.user_id] = True

    def observe_many(self, events):
        for event in events:
            self.observe(event)

    def user_vectors(self, user_ids):
        return np.full((len(user_ids), 4), 0.5, np.float32)

    def user_histories(self, user_ids):
        """No histories kept: every user's is empty (their vectors carry no ``because``)."""
        return np.zeros((len(user_ids), 2), np.int64), np.zeros((len(user_ids), 2), np.float32)

    def on_step(self, callback):
        pass

    def drop_pending(self, slot):
        """The observed events of the user ``users.remove`` returned ``slot`` for."""
        kept = [e for e in self.observed if e.user_id != slot]
        dropped, self.observed = len(self.observed) - len(kept), kept
        return dropped

    def shed_pending(self, keep):
        return 0

    def learn(self, max_samples=None):
        if not self.allow_training or not self.observed:
            return None
        taken, self.observed = self.observed[:max_samples], self.observed[max_samples:]
        self.model_version += 1
        return LearnReport(self.model_version, len(taken), 0.01, 1.0, 0.0, 0, 1, 0)

    def items_to_publish(self, min_change=0.0):
        return [], np.zeros((0, 4), np.float32)


def skip_checkpoint_files(worker: Worker) -> None:
    """The worker's fake learner has nothing to save: checkpoints keep their bookkeeping only."""
    worker.checkpointer.store.prepare = lambda learner, extra: None
    worker.checkpointer.store.write = lambda prepared, **_: None


def make_worker(tmp_path, polls=(), learner=None, fresh_broker=False,
                **settings) -> tuple[Worker, FakeConsumer, FakeProducer]:
    """A worker on fakes (default: ``FakeLearner``), its scripted consumer and its producer."""
    config = Settings(bootstrap_servers="127.0.0.1:1", state_dir=tmp_path / "state", metrics_port=0,
                      background_training=False, checkpoint_interval_s=1000, max_experience_wait_s=1000,
                      progress_interval_s=1000, **settings)
    worker = Worker(config, learner=learner or FakeLearner(), metrics=WorkerMetrics(), fresh_broker=fresh_broker)
    consumer, producer = FakeConsumer(polls, assigned={TP0}), FakeProducer()
    worker.attach(KafkaSource(consumer, sleep=lambda s: None), FakeItems(), producer)
    worker.lifecycle.sleep = lambda seconds: None  # no real waits between delivery attempts
    worker.connected = True
    return worker, consumer, producer


def gauge(metric) -> float:
    return metric._value.get()  # noqa: SLF001
