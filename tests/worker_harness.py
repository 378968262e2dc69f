"""Run the real ``recstream worker`` as a subprocess against a broker, for integration tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaProducer

from learners.records import Event, Item, event_to_json, item_to_json
from stream.kafka.broker import ensure_topics


def free_port(span: int = 1) -> int:
    """A free port, and the ``span - 1`` after it free too: the ranks of a group serve metrics on
    consecutive ports (``--metrics-port`` + local rank)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("", 0))
            base = sock.getsockname()[1]
        if all(_is_free(base + i) for i in range(1, span)):
            return base
    raise RuntimeError(f"no {span} consecutive free ports found")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except (OSError, OverflowError):  # taken, or past 65535
            return False
        return True


@dataclass
class Topics:
    events: str
    items: str
    vectors: str
    dlq: str
    group: str
    forget: str
    changelog: str


def make_topics(bootstrap: str, unique, partitions: int = 3) -> Topics:
    t = Topics(unique("events"), unique("items"), unique("vectors"), unique("dlq"), unique("group"),
               unique("forget"), unique("changelog"))
    ensure_topics(bootstrap, {t.events: partitions, t.items: 1, t.vectors: partitions, t.dlq: 1, t.forget: 1,
                              t.changelog: partitions},
                  compacted={t.items, t.vectors, t.changelog})
    return t


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def produce_items(bootstrap: str, topic: str, items: list[Item]) -> None:
    produce(bootstrap, topic, [(i.item_id.encode(), item_to_json(i)) for i in items])


def produce_events(bootstrap: str, topic: str, events: list[Event]) -> None:
    produce(bootstrap, topic, [(e.user_id.encode(), event_to_json(e)) for e in events])


def changelog_histories(bootstrap: str, topic: str) -> dict[str, tuple[str, ...]]:
    """Each user's newest history in the changelog topic (item ids, oldest first; erased users left out)."""
    from stream.kafka.broker import read_topic
    from stream.kafka.changelog import decode_user_state

    latest: dict[str, tuple[str, ...]] = {}
    for record in read_topic(bootstrap, topic):
        state = decode_user_state(record.key, record.value) if record.value is not None else None
        if state is None:
            latest.pop(record.key.decode(), None)
        else:
            latest[state.user_id] = state.items
    return latest


def summed(ranks: list[dict[str, float]], name: str) -> float:
    """One metric summed over the ranks' metrics."""
    return sum(m.get(name, 0.0) for m in ranks)


def committed_offsets(bootstrap: str, group: str, topic: str, partitions) -> dict[int, int]:
    """The group's committed offset of each of ``topic``'s ``partitions`` (None: nothing committed)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        consumer.close()


class WorkerProcess:
    """``recstream worker`` in a subprocess with fast-joining group settings."""

    def __init__(self, bootstrap: str, topics: Topics, state_dir: Path, log_path: Path,
                 command: list[str] | None = None, **settings) -> None:
        """``command``: what to run instead of ``recstream worker`` (e.g. torchrun starting ranks of it)."""
        self.port = free_port(span=4)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.update({
            "RECSTREAM_BOOTSTRAP_SERVERS": bootstrap, "RECSTREAM_GROUP_ID": topics.group,
            "RECSTREAM_EVENTS_TOPIC": topics.events, "RECSTREAM_ITEMS_TOPIC": topics.items,
            "RECSTREAM_VECTORS_TOPIC": topics.vectors, "RECSTREAM_DLQ_TOPIC": topics.dlq,
            "RECSTREAM_FORGET_TOPIC": topics.forget, "RECSTREAM_CHANGELOG_TOPIC": topics.changelog,
            "RECSTREAM_STATE_DIR": str(state_dir), "RECSTREAM_METRICS_PORT": str(self.port),
            "RECSTREAM_MAX_POLL_INTERVAL_MS": "5000", "RECSTREAM_SESSION_TIMEOUT_MS": "6000",
            "RECSTREAM_DEVICE": "cpu",
        })
        env.update({f"RECSTREAM_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(command or [sys.executable, "-m", "stream.cli", "worker"], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def metrics(self, port_offset: int = 0) -> dict[str, float]:
        """Unlabelled and summed-over-labels samples of /metrics (empty while not serving);
        ``port_offset``: another rank's (``--distributed`` serves on the port + LOCAL_RANK)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port + port_offset}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
            if match:
                out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(3))
        return out

    def wait_for(self, predicate, timeout_s: float, what: str) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early ({self.proc.returncode}) waiting for {what}:\n{self.tail()}")
            m = self.metrics()
            if m and predicate(m):
                return m
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; last metrics {self.metrics()}\n{self.tail()}")

    def rank_metrics(self, ranks: int) -> list[dict[str, float]]:
        """``metrics`` of every rank of a torchrun group (one port each)."""
        return [self.metrics(port_offset=r) for r in range(ranks)]

    def wait_for_ranks(self, ranks: int, predicate, timeout_s: float, what: str,
                       poll_s: float = 0.5) -> list[dict[str, float]]:
        """``wait_for`` over all ranks: ``predicate`` sees every rank's metrics, once all serve."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"torchrun exited early ({self.proc.returncode}) waiting for {what}:\n"
                                     f"{self.tail(80)}")
            metrics = self.rank_metrics(ranks)
            if all(metrics) and predicate(metrics):
                return metrics
            time.sleep(poll_s)
        raise AssertionError(f"timed out waiting for {what}; last metrics {self.rank_metrics(ranks)}\n{self.tail(80)}")

    def terminate(self, timeout_s: float = 120.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def close_log(self) -> None:
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the worker and every process under it (torchrun's ranks), so none is left behind."""
        family = _descendants(self.proc.pid)
        self.proc.kill()
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; none where it cannot be read)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
