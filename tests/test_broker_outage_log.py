"""A broker outage is one WARNING and one INFO in the worker's log, not a traceback per attempt:
``stream/kafka/connection_noise.py`` on hand-made records, then a worker whose broker is killed."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import sys
import time
import uuid

import pytest

from stream.kafka import connection_noise
from stream.kafka.connection_noise import ConnectionNoiseFilter, OutageLog, quiet_connection_noise


def _record(name: str, level: int, message: str, *args, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, level, __file__, 1, message, args, exc_info)


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - a real traceback for the record
        return caught


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


CONNECTION_NOISE = [
    _record("kafka.net.transport", logging.ERROR, "%s: Error receiving network data closing socket",
            "<KafkaTCPTransport [127.0.0.1:9092]>", exc=_raised(ConnectionResetError(104, "Connection reset by peer"))),
    _record("kafka.net.transport", logging.ERROR, "%s: Error sending request data: %s", "<t>", "[Errno 32] Broken pipe",
            exc=_raised(BrokenPipeError(32, "Broken pipe"))),
    _record("kafka.net.manager", logging.ERROR, "Connection failed: %s", "KafkaConnectionError: 111 ECONNREFUSED"),
    _record("kafka.net.transport", logging.ERROR, "%s: socket disconnected", "<KafkaTCPTransport>"),
    _record("kafka.consumer.fetcher", logging.ERROR, "Fetch to node 1 failed: KafkaConnectionError: socket disconnected"),
    _record("kafka.cluster", logging.ERROR, "Metadata refresh: failed KafkaConnectionError: 111 ECONNREFUSED"),
    _record("kafka.coordinator", logging.WARNING, "Marking the coordinator dead (node coordinator-1) for group g: "
            "KafkaConnectionError: 111 ECONNREFUSED."),
    _record("kafka.conn", logging.ERROR, "Connect attempt to <BrokerConnection host=b:9092> returned error 111. "
            "Disconnecting."),
]
KEPT = [
    _record("kafka.producer.sender", logging.ERROR, "Aborting producer batches due to fatal error: KafkaError: "
            "Unexpected error in InitProducerIdResponse: [Error -1] UnknownError"),
    _record("kafka.coordinator.heartbeat", logging.WARNING, "Heartbeat: local member_id was not recognized"),
    _record("stream.worker", logging.ERROR, "checkpoint failed", exc=_raised(ConnectionResetError(104, "reset"))),
    _record("kafkaesque", logging.ERROR, "Connection failed: KafkaConnectionError: 111 ECONNREFUSED"),
]


def test_the_filter_drops_only_kafka_pythons_connection_failures():
    noise = ConnectionNoiseFilter(OutageLog(clock=_Clock()))
    assert [noise.filter(record) for record in CONNECTION_NOISE] == [False] * len(CONNECTION_NOISE)
    assert [noise.filter(record) for record in KEPT] == [True] * len(KEPT)


def test_one_warning_when_kafka_goes_and_one_info_with_its_length_when_it_is_back(caplog):
    clock = _Clock()
    outage = OutageLog("kafka-1:9092", clock=clock)
    noise = ConnectionNoiseFilter(outage, {"kafka.net.connection": logging.WARNING})
    connected = _record("kafka.net.connection", logging.INFO, "%s: Connected", "<KafkaConnection node_id=1>")
    caplog.set_level(logging.INFO, logger="stream.worker")
    # A dropped connection that reconnects at once is no outage.
    noise.filter(CONNECTION_NOISE[3])
    clock.now += 0.3
    assert noise.filter(connected) is False  # seen, not shown: below the level kafka's records show at
    assert not caplog.records

    for _ in range(3):  # two outages, each many failed attempts long
        caplog.clear()
        for _ in range(50):
            for record in CONNECTION_NOISE:
                noise.filter(record)
            clock.now += 0.25
        assert outage.unreachable
        noise.filter(connected)
        noise.filter(connected)
        messages = [(r.levelname, r.getMessage()) for r in caplog.records]
        assert len(messages) == 2, messages
        assert messages[0][0] == "WARNING" and "Kafka at kafka-1:9092 is unreachable (ConnectionResetError" \
            in messages[0][1]
        assert messages[1] == ("INFO", "Kafka at kafka-1:9092 is reachable again after 12.5 s")
        assert not outage.unreachable
        clock.now += 60


def test_failures_far_apart_are_separate_blips_not_one_outage(caplog):
    clock = _Clock()
    outage = OutageLog(clock=clock)
    caplog.set_level(logging.INFO, logger="stream.worker")
    for _ in range(4):  # an idle connection the broker closes now and then, with nothing to reconnect it
        outage.failed("socket disconnected")
        clock.now += connection_noise.EPISODE_GAP_S + 1
    assert not caplog.records and not outage.unreachable


def test_installed_on_the_handlers_it_keeps_tracebacks_of_connection_attempts_out_of_the_log():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root, kafka = logging.getLogger(), logging.getLogger("kafka")
    touched = [root, kafka] + [logging.getLogger(name) for name in connection_noise._CONNECTION_LOGGERS]  # noqa: SLF001
    levels = [logger.level for logger in touched]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    kafka.setLevel(logging.WARNING)
    noise = None
    try:
        noise = quiet_connection_noise("b:9092")
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError:
            logging.getLogger("kafka.net.transport").exception("<KafkaTCPTransport>: Error receiving network data")
        logging.getLogger("kafka.net.connection").info("<KafkaConnection node_id=1>: Broker version identified")
        logging.getLogger("kafka.producer.sender").error("Aborting producer batches due to fatal error")
        logging.getLogger("stream.worker").error("a worker error stays")
        text = stream.getvalue()
        assert "Traceback" not in text and "Error receiving" not in text and "Broker version" not in text
        assert "Aborting producer batches" in text and "a worker error stays" in text
    finally:
        for installed in root.handlers:
            installed.removeFilter(noise)
        root.removeHandler(handler)
        for logger, level in zip(touched, levels):
            logger.setLevel(level)


# -- a real worker whose broker is killed -------------------------------------------------------

@pytest.mark.integration
def test_a_killed_broker_is_one_warning_and_one_info_and_no_traceback(tmp_path):
    from learners.synthetic import SyntheticWorld
    from stream.kafka.broker import EmbeddedBroker, ensure_topics
    from worker_harness import Topics, WorkerProcess, free_port, produce_events, produce_items

    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    tag = uuid.uuid4().hex[:6]
    topics = Topics(*(f"{name}-{tag}" for name in ("events", "items", "vectors", "dlq", "group", "forget",
                                                     "changelog")))

    def create_topics() -> None:
        ensure_topics(bootstrap, {topics.events: 2, topics.items: 1, topics.vectors: 2, topics.dlq: 1,
                                  topics.forget: 1, topics.changelog: 2},
                      compacted={topics.items, topics.vectors, topics.changelog})

    world = SyntheticWorld(n_items=40, n_users=20, seed=3)
    broker = EmbeddedBroker(port=port).start()
    worker = None
    try:
        create_topics()
        produce_items(bootstrap, topics.items, world.items())
        produce_events(bootstrap, topics.events, list(world.events(200, id_prefix="before")))
        worker = WorkerProcess(bootstrap, topics, tmp_path / "state", tmp_path / "worker.log",
                               batch_size=32, negatives=32, experience_size=128, replay_size=512,
                               max_text_tokens=16, checkpoint_interval_s=3, progress_interval_s=60)
        worker.wait_for(lambda m: m.get("recstream_events_valid_total", 0) >= 200, 120, "the first events")
        errors_before = worker.metrics()["recstream_broker_errors_total"]

        os.kill(broker.pid, signal.SIGKILL)  # connections reset, nothing said goodbye
        broker.stop()
        time.sleep(8)
        broker = EmbeddedBroker(port=port).start()
        create_topics()
        deadline = time.monotonic() + 60
        while "is reachable again" not in worker.tail(400) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # anything the reconnection still logs
        m = worker.metrics()
    finally:
        if worker is not None and worker.proc.poll() is None:
            worker.kill()
        broker.stop()
    log = (tmp_path / "worker.log").read_text()
    print(f"\nbroker errors counted {errors_before:.0f} -> {m.get('recstream_broker_errors_total', 0):.0f}")
    assert "Traceback" not in log, log[-4000:]
    unreachable = re.findall(r"WARNING stream\.worker: Kafka at \S+ is unreachable", log)
    back = re.findall(r"INFO stream\.worker: Kafka at \S+ is reachable again after (\d+\.\d) s", log)
    assert len(unreachable) == 1 and len(back) == 1, log[-4000:]
    assert 8 <= float(back[0]) < 70
    assert not re.search(r"ERROR kafka\.net", log), log[-4000:]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
