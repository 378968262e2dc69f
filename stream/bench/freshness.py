"""Freshness and memory: a steady stream into a production worker, measured from outside.

The worker runs in its own process (``stream.bench.child``) with training on
and the product's settings (checkpoints every ``checkpoint_interval_s``
included). Here, one producer thread sends ``rate`` events/s (record
timestamp = send time) and one reader thread follows the vectors topic:

* event -> user vector: an event is served by the first vector record of its
  user created after the event was sent; latency = when the reader saw that
  record minus the event's send time (``visible``), and minus the record's
  own create time (``sent``, excludes the reader). Users come round-robin, so
  a user's events are ``users / rate`` seconds apart and the match is exact
  while latency stays below that (``match_exact_below_s``). The worker's
  own per-event figure (``in_process``: after the publishing flush) is
  reported next to it as a cross-check.
* model update -> item vectors: for every item record with model version
  ``v``, when the reader saw it minus when version ``v`` finished training
  in the worker (re-embedding, table rebuild and publishing are inside).
* memory: the worker's resident set size, sampled by pid every
  ``sample_every_s``; growth = median of the last minute of samples /
  median of the first minute after ``warmup_s`` - 1 (``_memory``).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import numpy as np

from stream.bench.common import BenchWorld, Cluster, LatencyHistogram, Progress, item_records, produce, \
    temp_state_dir

log = logging.getLogger(__name__)

TARGET_EVENT_P99_S = 1.0
TARGET_ITEM_P99_S = 5.0
TARGET_GROWTH = 0.05


class Matcher:
    """Per-user queues of event send times (only events not yet served: bounded by the backlog)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, collections.deque] = {}
        self.sent = 0
        self.visible = LatencyHistogram()
        self.sent_hist = LatencyHistogram()
        self.started_ms: Optional[int] = None
        self.timeline: dict[int, list] = {}  # second of the run -> [events, worst latency]

    def produced(self, user_id: str, ts_ms: int) -> None:
        with self._lock:
            self._waiting.setdefault(user_id, collections.deque()).append(ts_ms)
            self.sent += 1

    def vector(self, user_id: str, created_ms: int, seen_s: float) -> None:
        with self._lock:
            queue = self._waiting.get(user_id)
            while queue and queue[0] <= created_ms:
                ts_ms = queue.popleft()
                latency = seen_s - ts_ms / 1000.0
                self.visible.add(latency)
                if self.started_ms is not None:
                    bucket = self.timeline.setdefault((ts_ms - self.started_ms) // 1000, [0, 0.0])
                    bucket[0] += 1
                    bucket[1] = max(bucket[1], round(latency, 3))
                self.sent_hist.add((created_ms - ts_ms) / 1000.0)
            if queue is not None and not queue:
                del self._waiting[user_id]

    def unserved(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._waiting.values())


class EventProducer(threading.Thread):
    def __init__(self, settings, world: BenchWorld, rate: float, matcher: Matcher, client_kwargs: dict,
                 id_prefix: str, linger_ms: int) -> None:
        super().__init__(name="bench-producer", daemon=True)
        from kafka import KafkaProducer

        self._producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers.split(","),
                                       linger_ms=linger_ms, acks=1, **client_kwargs)
        self._topic, self._world, self._rate = settings.events_topic, world, rate
        self._matcher, self._prefix = matcher, id_prefix
        self._stop_event = threading.Event()
        self.behind_s = 0.0  # worst lag of the sending loop behind its schedule

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        from learners.records import event_to_json

        started = time.monotonic()
        sent = 0
        try:
            for event in self._world.events(0, 10 ** 12, id_prefix=self._prefix):
                if self._stop_event.is_set():
                    break
                ts_ms = int(event.ts * 1000)
                self._matcher.produced(event.user_id, ts_ms)
                self._producer.send(self._topic, key=event.user_id.encode(), value=event_to_json(event),
                                    timestamp_ms=ts_ms)
                sent += 1
                ahead = sent / self._rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
                else:
                    self.behind_s = max(self.behind_s, -ahead)
            self._producer.flush()
        finally:
            self._producer.close()


class VectorReader(threading.Thread):
    def __init__(self, settings, matcher: Matcher, client_kwargs: dict) -> None:
        super().__init__(name="bench-reader", daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self._consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers.split(","), group_id=None,
                                       enable_auto_commit=False, auto_offset_reset="earliest",
                                       fetch_max_wait_ms=50, **client_kwargs)
        parts = self._consumer.partitions_for_topic(settings.vectors_topic) or set()
        tps = [TopicPartition(settings.vectors_topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)
        self._matcher = matcher
        self._stop_event = threading.Event()
        self.item_versions: list[int] = []
        self.item_seen: list[float] = []
        self.user_records = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        loads = json.loads
        try:
            while not self._stop_event.is_set():
                polled = self._consumer.poll(timeout_ms=100)
                seen = time.time()
                for records in polled.values():
                    for record in records:
                        # The key says whose vector it is (user:<id> / item:<id>, docs/formats.md); only
                        # item records are decoded (for their model version): the reader shares
                        # the CPU with the worker, so it does as little as it can.
                        kind, _, entity = record.key.decode().partition(":")
                        if kind == "user":
                            self.user_records += 1
                            self._matcher.vector(entity, record.timestamp, seen)
                        else:
                            self.item_versions.append(int(loads(record.value)["payload"]["model_version"]))
                            self.item_seen.append(seen)
        finally:
            self._consumer.close()


def _rss(pid: int) -> Optional[int]:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def _wait_ready(proc: subprocess.Popen, ready_path: str, log_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(ready_path):
        if proc.poll() is not None:
            raise RuntimeError(f"the bench worker exited with {proc.returncode} before it was ready; "
                               f"log {log_path}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the bench worker was not ready after {timeout_s:.0f}s; log {log_path}")
        time.sleep(0.2)


def _read_json(path: Optional[str]) -> Optional[dict]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, TypeError, ValueError):
        return None


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(collections.deque(fh, maxlen=lines))
    except OSError:
        return ""


def run(cluster: Cluster, world: BenchWorld, *, seconds: float, rate: float, linger_ms: int,
        sample_every_s: float, warmup_s: float, progress: Progress, phase: str = "freshness",
        settings_overrides: Optional[dict] = None, memory: bool = True,
        on_sample: Optional[Callable[[float, Optional[int], "Matcher", Optional[dict]], None]] = None) -> dict:
    """``on_sample(t_s, rss_bytes, matcher, sizes)`` runs at every memory sample, ``sizes`` the
    worker's bounded structures as of its last status (benchmarks/soak.py)."""
    settings = cluster.topics(phase).model_copy(update={
        "state_dir": temp_state_dir(phase), "metrics_port": 0, **(settings_overrides or {})})
    client_kwargs = cluster.client_kwargs()
    items = world.items()
    produce(settings, settings.items_topic, item_records(items), client_kwargs)
    workdir = tempfile.mkdtemp(prefix=f"recstream-bench-{phase}-")
    config = {"settings": json.loads(settings.model_dump_json()), "expect_items": len(items),
              "ready_path": os.path.join(workdir, "ready.json"), "result_path": os.path.join(workdir, "result.json")}
    if on_sample is not None:
        config.update(status_path=os.path.join(workdir, "status.json"), status_every_s=min(10.0, sample_every_s))
    config_path = os.path.join(workdir, "config.json")
    with open(config_path, "w") as fh:
        json.dump(config, fh)
    log_path = os.path.join(workdir, "worker.log")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "stream.bench.child", config_path], stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        t_spawn = time.monotonic()
        _wait_ready(proc, config["ready_path"], log_path, timeout_s=900.0)
        progress(f"{phase}: worker pid {proc.pid} ready in {time.monotonic() - t_spawn:.0f}s "
                 f"({len(items)} item texts, {world.n_users} users, {world.n_items} items); "
                 f"{rate:.0f} events/s for {seconds:.0f}s")
        matcher = Matcher()
        reader = VectorReader(settings, matcher, client_kwargs)
        reader.start()
        producer = EventProducer(settings, world, rate, matcher, client_kwargs,
                                 id_prefix=f"{phase}-{cluster.run_id}", linger_ms=linger_ms)
        started = time.monotonic()
        matcher.started_ms = int(time.time() * 1000)
        producer.start()
        samples: list[tuple[float, int]] = []
        next_sample = started
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            if now >= next_sample:
                rss = _rss(proc.pid)
                if rss is not None:
                    samples.append((round(now - started, 2), rss))
                if on_sample is not None:
                    on_sample(now - started, rss, matcher, _read_json(config.get("status_path")))
                next_sample += sample_every_s
            if proc.poll() is not None:
                raise RuntimeError(f"the bench worker died (exit {proc.returncode}); log {log_path}:\n"
                                   f"{_tail(log_path)}")
            time.sleep(min(0.2, max(0.0, next_sample - time.monotonic())))
        rss = _rss(proc.pid)
        if rss is not None:
            samples.append((round(time.monotonic() - started, 2), rss))
        if on_sample is not None:
            on_sample(time.monotonic() - started, rss, matcher, _read_json(config.get("status_path")))
        producer.stop()
        producer.join(timeout=30)
        grace = time.monotonic() + max(15.0, min(60.0, seconds / 4))
        while matcher.unserved() and time.monotonic() < grace:
            time.sleep(0.2)
        time.sleep(1.0)  # item vectors of the last update
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the bench worker did not stop within 180s of SIGTERM; log {log_path}")
        reader.stop()
        reader.join(timeout=10)
        with open(config["result_path"]) as fh:
            child = json.load(fh)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    updates = {int(v): t for v, t in child["model_updates"].items()}
    item_hist = LatencyHistogram()
    unmatched_items = 0
    for version, seen in zip(reader.item_versions, reader.item_seen):
        finished = updates.get(version)
        if finished is None:
            unmatched_items += int(version > 0)
            continue
        item_hist.add(seen - finished)
    visible = matcher.visible.summary()
    item = item_hist.summary()
    result = {
        "rate_events_per_s": rate, "load_producer_linger_ms": linger_ms, "seconds": seconds,
        "users": world.n_users, "items": world.n_items, "item_texts": len(items),
        "events_sent": matcher.sent, "events_unserved": matcher.unserved(),
        "producer_behind_max_s": round(producer.behind_s, 3),
        "match_exact_below_s": round(world.n_users / rate, 3),
        "event_to_vector": {"visible": visible, "sent": matcher.sent_hist.summary(),
                            "in_process": child["event_to_vector_in_process"]},
        "item_refresh": {**item, "records": len(reader.item_versions), "unmatched": unmatched_items,
                         "model_updates": len(updates)},
        "targets": {"event_p99_s": TARGET_EVENT_P99_S, "item_p99_s": TARGET_ITEM_P99_S},
        "met": {"event_p99": bool(visible["p99_s"] is not None and visible["p99_s"] <= TARGET_EVENT_P99_S),
                "item_p99": bool(item["p99_s"] is not None and item["p99_s"] <= TARGET_ITEM_P99_S)},
        "worker": {k: child[k] for k in ("totals", "metrics", "model_version", "users", "catalogue", "sizes")},
        "worst_latency_per_second": [[int(sec), b[1]] for sec, b in sorted(matcher.timeline.items())],
        "model_updates_at_s": sorted(round(t - matcher.started_ms / 1000.0, 2) for t in updates.values()),
        # [start s, learner held s, write s] of every checkpoint
        "checkpoints_at_s": [[round(t - matcher.started_ms / 1000.0, 2), round(held, 3), round(write, 3)]
                             for t, held, write in child["checkpoints"]],
        "settings": {k: getattr(settings, k) for k in (
            "experience_size", "max_experience_wait_s", "max_pending_events", "overload",
            "checkpoint_interval_s", "batch_size", "replay_batch", "device", "producer_linger_ms")},
        "worker_log": log_path,
    }
    if memory:
        result["memory"] = _memory(samples, warmup_s, sample_every_s)
    return result


def _memory(samples: list[tuple[float, int]], warmup_s: float, every_s: float) -> dict:
    """RSS growth after warm-up: the median of the last window of samples over the median of the
    first window after ``warmup_s`` (a window: a minute, or three samples in short runs).

    RSS moves by a few hundred MiB within every experience and checkpoint write (transient
    buffers, handed back to the OS by ``stream.worker.heap.trim``), so two single samples measure
    where each fell in that cycle as much as the level; ``growth_last_sample`` is that
    older figure, kept next to it.
    """
    after = [(t, rss) for t, rss in samples if t >= warmup_s]
    out = {"sample_every_s": every_s, "warmup_s": warmup_s, "target_growth": TARGET_GROWTH,
           "samples": [[t, round(rss / 2 ** 20, 1)] for t, rss in samples]}
    if len(after) < 2:
        return {**out, "growth": None, "met": None}
    span = after[-1][0] - after[0][0]
    window_s = max(3 * every_s, min(60.0, span / 5))
    first = [rss for t, rss in after if t <= after[0][0] + window_s]
    last = [rss for t, rss in after if t >= after[-1][0] - window_s]
    base, end = float(np.median(first)), float(np.median(last))
    peak = max(rss for _, rss in after)
    growth = end / base - 1.0
    slope = float(np.polyfit([t for t, _ in after], [rss for _, rss in after], 1)[0]) if len(after) >= 3 else None
    return {**out, "growth_method": f"median of the last {window_s:.0f} s of samples / median of the first "
                                    f"{window_s:.0f} s after warm-up - 1",
            "window_s": window_s, "rss_at_warmup_mb": round(base / 2 ** 20, 1), "rss_end_mb": round(end / 2 ** 20, 1),
            "rss_peak_mb": round(peak / 2 ** 20, 1), "growth": round(growth, 4),
            "growth_last_sample": round(after[-1][1] / after[0][1] - 1.0, 4),
            "peak_growth": round(peak / base - 1.0, 4),
            "slope_mb_per_min": None if slope is None else round(slope * 60 / 2 ** 20, 2),
            "met": bool(growth <= TARGET_GROWTH)}
