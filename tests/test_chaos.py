"""Never lose an event: SIGKILL, SIGTERM, rebalances, a broker that is not there, hostile input.

Real parts only: the ``recstream worker`` process (``WorkerProcess``), the real
model with small knobs, and the embedded tansu broker, or any Kafka named by
``RECSTREAM_TEST_BOOTSTRAP`` (then that cluster is used instead; the test of a
broker that comes and goes always starts its own embedded one, since it has to
stop it).

The verdict comes from the worker's own accounting: ``Totals`` live in every
checkpoint's ``extra`` and are read with ``CheckpointStore.latest_extra`` after
the last SIGTERM. The ``recstream_events_*`` counters are per process and start
from 0 on every restart, as Prometheus counters should; they only pace the test.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import psutil
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from learners.checkpoint import CheckpointStore
from learners.records import event_to_json
from learners.synthetic import SyntheticWorld
from stream.kafka.broker import EmbeddedBroker, ensure_topics, log_end_offsets, read_topic
from stream.kafka.recovery import dead_letter_source
from worker_harness import Topics, WorkerProcess, free_port, make_topics, produce_items

pytestmark = pytest.mark.integration

EXTERNAL_BOOTSTRAP = os.environ.get("RECSTREAM_TEST_BOOTSTRAP") or None

# Small model knobs: these tests are about delivery, not about learning. A long
# max.poll.interval (= the rebalance timeout) lets a member finish its experience
# and checkpoint before it rejoins, even on a slow shared machine.
FAST = {"batch_size": 64, "negatives": 64, "experience_size": 256, "max_pending_events": 512,
        "replay_size": 2048, "max_text_tokens": 16, "checkpoint_interval_s": 3, "progress_interval_s": 5,
        "max_poll_interval_ms": 60000, "max_poll_records": 500}


@pytest.fixture
def bootstrap(request) -> str:
    if EXTERNAL_BOOTSTRAP:
        return EXTERNAL_BOOTSTRAP
    return request.getfixturevalue("broker").bootstrap


# -- the stream ------------------------------------------------------------------

def malformed(i: int) -> bytes:
    """A bad record, unique per ``i`` so the dead-letter topic can be compared as a multiset."""
    kind = i % 8
    return [
        b"not json at all #%d" % i,
        b'{"event_id": "bad-%d", "user_id": "u", "item_id": "i", "event_type": "click"}' % i,  # no ts
        b'{"event_id": "bad-%d", "user_id": "", "item_id": "i", "event_type": "click", "ts": 1.0}' % i,
        b'{"event_id": "bad-%d", "user_id": "u", "item_id": "i", "event_type": "share", "ts": 1.0}' % i,
        b'{"event_id": "bad-%d", "user_id": "u", "item_id": "i", "event_type": "click", "ts": NaN}' % i,
        b'{"event_id": %d, "user_id": "u", "item_id": "i", "event_type": "click", "ts": 1.0}' % i,
        b"\xff\xfe invalid utf-8 #%d" % i,
        b"[%d, 2, 3]" % i,
    ][kind]


def hostile_stream(events, rng: random.Random, bad_share: float, duplicate_share: float):
    """The events in order, plus bad records anywhere and repeated deliveries (same key, same
    bytes, so the same partition) somewhere after their original."""
    n = len(events)
    placed = [(float(i), e.user_id.encode(), event_to_json(e)) for i, e in enumerate(events)]
    duplicated = rng.sample(range(n), int(n * duplicate_share))
    for i in duplicated:
        placed.append((rng.uniform(i + 0.5, n), events[i].user_id.encode(), event_to_json(events[i])))
    bad = [malformed(i) for i in range(int(n * bad_share))]
    for i, value in enumerate(bad):
        placed.append((rng.uniform(0, n), b"bad-%d" % i, value))
    placed.sort(key=lambda p: p[0])
    return [(key, value) for _, key, value in placed], bad, len(duplicated)


def produce_all(bootstrap: str, topic: str, records) -> dict[int, int]:
    """Produce in order; returns {partition: next offset after what was written}."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in records]
        producer.flush()
        ends: dict[int, int] = {}
        for future in futures:
            md = future.get(timeout=60)
            ends[md.partition] = max(ends.get(md.partition, 0), md.offset + 1)
        return ends
    finally:
        producer.close()


class PacedProducer(threading.Thread):
    """Produces ``records`` in order, ``chunk`` at a time every ``pace_s``: a live stream that
    the worker's incarnations keep up with, so that every kill lands mid-stream."""

    def __init__(self, bootstrap: str, topic: str, records, chunk: int, pace_s: float):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.records = bootstrap, topic, records
        self.chunk, self.pace_s = chunk, pace_s
        self.ends: dict[int, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(0, len(self.records), self.chunk):
                started = time.monotonic()
                self.ends = merge_ends(self.ends, produce_all(self.bootstrap, self.topic,
                                                              self.records[i:i + self.chunk]))
                time.sleep(max(0.0, self.pace_s - (time.monotonic() - started)))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    @property
    def done(self) -> bool:
        return not self.is_alive()


class GroupOffsets:
    """The group's committed offsets, read without joining it."""

    def __init__(self, bootstrap: str, group: str, topic: str):
        self.topic = topic
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)

    def __call__(self, partitions) -> dict[int, int | None]:
        return {p: self.consumer.committed(TopicPartition(self.topic, p)) for p in partitions}

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def merge_ends(a: dict, b: dict) -> dict:
    return {p: max(a.get(p, 0), b.get(p, 0)) for p in set(a) | set(b)}


def final_totals(state_dir: Path) -> dict:
    extra = CheckpointStore(state_dir).latest_extra()
    assert extra is not None, f"no complete checkpoint in {state_dir}"
    return extra["totals"]


def log_count(paths, needle: str) -> int:
    return sum(p.read_text(errors="replace").count(needle) for p in paths if p.exists())


def assert_dead_letters_exact(bootstrap: str, topic: str, bad: list[bytes]) -> list:
    dead = read_topic(bootstrap, topic)
    assert Counter(r.value for r in dead) == Counter(bad), "the dead-letter topic must hold exactly the bad records"
    sources = [dead_letter_source(r.headers) for r in dead]
    assert None not in sources and len(set(sources)) == len(sources)
    assert all(dict(r.headers).get("reason") for r in dead)
    return dead


def latest_vectors(records) -> dict[str, dict]:
    latest = {}
    for record in records:
        latest[record.key.decode()] = json.loads(record.value)
    return latest


def launch(bootstrap: str, topics: Topics, state_dir: Path, log_path: Path, **settings) -> WorkerProcess:
    """A worker process serving /metrics. The harness picks a free metrics port before the
    model loads; on a busy machine another process can take it meanwhile: then start again."""
    for _ in range(3):
        worker = WorkerProcess(bootstrap, topics, state_dir, log_path, **settings)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and worker.proc.poll() is None and not worker.metrics():
            time.sleep(0.5)
        if worker.proc.poll() is None or "Address already in use" not in worker.tail(5):
            return worker  # serving, or failing for a reason the caller's wait_for reports
        worker._log.close()  # noqa: SLF001
    return worker


def stopped(worker: WorkerProcess, how: str) -> None:
    if how == "kill":
        worker.kill()
    else:
        code = worker.terminate()
        assert code == 0, f"SIGTERM must exit 0, got {code}:\n{worker.tail()}"


# -- 1. crashes, restarts, hostile input ------------------------------------------

def test_chaos_kill_and_restart_apply_every_event_exactly_once(bootstrap, unique_topic, tmp_path):
    started = time.monotonic()
    rng = random.Random(20261123)
    topics = make_topics(bootstrap, unique_topic)
    world = SyntheticWorld(n_items=150, n_users=250, seed=5)
    items = world.items()
    events = list(world.events(20_000, id_prefix=f"chaos-{uuid.uuid4().hex[:8]}"))
    records, bad, n_duplicates = hostile_stream(events, rng, bad_share=0.02, duplicate_share=0.01)
    produce_items(bootstrap, topics.items, items)  # items first
    # A live stream: 500 records every 2 s (about 80 s in all) while the worker dies and restarts.
    stream = PacedProducer(bootstrap, topics.events, records, chunk=500, pace_s=2.0)
    stream.start()
    print(f"\nproducing {len(events)} events + {len(bad)} malformed + {n_duplicates} duplicate deliveries "
          f"= {len(records)} records")

    state_dir = tmp_path / "state"
    committed = GroupOffsets(bootstrap, topics.group, topics.events)

    def all_done(m) -> bool:
        return (stream.done and m.get("recstream_pending_events", 1) == 0
                and committed(stream.ends) == stream.ends)

    # Three SIGKILLs at random moments (one right after a model update, before the checkpoint that
    # follows it: vectors of a version newer than the checkpoint's are out), one SIGTERM, then run
    # to the end.
    plan = ["kill", "kill-after-update", "term", "kill"]
    logs = []
    try:
        for n, how in enumerate(plan + ["end"]):
            log_path = tmp_path / f"worker-{n}.log"
            logs.append(log_path)
            t0 = time.monotonic()
            worker = launch(bootstrap, topics, state_dir, log_path, **FAST)
            try:
                if how == "end":
                    worker.wait_for(all_done, 600, "every record consumed, trained and committed")
                    stopped(worker, "term")
                    print(f"incarnation {n}: ran to the end in {time.monotonic() - t0:.0f}s")
                    break
                threshold = rng.randint(500, 3000)
                m = worker.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= threshold
                                    or all_done(m), 600, f"{threshold} records consumed")
                if how == "kill-after-update":
                    version = m.get("recstream_model_version", 0)
                    m = worker.wait_for(lambda m: m.get("recstream_model_version", 0) > version, 600,
                                        "a model update")
                else:
                    time.sleep(rng.uniform(0.0, 4.0))  # anywhere: mid-batch, mid-experience, mid-checkpoint
                stopped(worker, "term" if how == "term" else "kill")
                print(f"incarnation {n}: {'SIGTERM' if how == 'term' else 'SIGKILL'} after "
                      f"{m['recstream_events_consumed_total']:.0f}+ records"
                      f"{', right after model update v%d' % m['recstream_model_version'] if how == 'kill-after-update' else ''}, "
                      f"{time.monotonic() - t0:.0f}s, stream {'done' if stream.done else 'still coming'}")
            except BaseException:
                if worker.proc.poll() is None:
                    worker.kill()
                raise
        stream.join()
        assert stream.error is None, stream.error
        ends = stream.ends
        final_committed = committed(ends)
    finally:
        committed.close()
    assert sum(ends.values()) == len(records)

    # The worker's own accounting, from its last checkpoint.
    totals = final_totals(state_dir)
    print(f"final totals: {totals}")
    assert totals["consumed"] == totals["valid"] + totals["dead_lettered"] + totals["duplicates"]
    assert totals["valid"] == len({e.event_id for e in events}) == len(events)
    assert totals["duplicates"] == n_duplicates
    assert totals["dead_lettered"] == len(bad)
    assert totals["consumed"] == len(records)
    assert totals["items"] == len(items)

    # The dead-letter topic holds exactly the malformed records (same multiset of bytes), once each.
    dead = assert_dead_letters_exact(bootstrap, topics.dlq, bad)

    # The group's committed offsets are at the end of the events log.
    log_ends = log_end_offsets(bootstrap, topics.events)
    assert log_ends == ends and final_committed == ends

    # Every user and item with events has a current vector.
    vector_records = read_topic(bootstrap, topics.vectors)
    latest = latest_vectors(vector_records)
    assert {k[5:] for k in latest if k.startswith("user:")} >= {e.user_id for e in events}
    assert {k[5:] for k in latest if k.startswith("item:")} >= {e.item_id for e in events} | {i.item_id for i in items}

    # The model version only went forward, across every restart, in the order of the vectors log.
    by_partition = defaultdict(list)
    for record in vector_records:
        by_partition[record.partition].append(json.loads(record.value)["payload"]["model_version"])
    for partition, versions in by_partition.items():
        backwards = [(a, b) for a, b in zip(versions, versions[1:]) if b < a]
        assert not backwards, f"vectors partition {partition}: model_version went back {backwards[:5]}"
    versions = sorted({v for vs in by_partition.values() for v in vs})

    prevented = log_count(logs, "were already in the dead-letter topic")
    bumped = log_count(logs, "were published after checkpoint version")
    rescanned = sum(int(n) for p in logs if p.exists()
                    for n in re.findall(r"dead-letter topic .* read from .*?: (\d+) record", p.read_text(errors="replace")))
    print(f"dead-letter topic: {len(dead)} records; vectors topic: {len(vector_records)} records, "
          f"{len(latest)} keys, model versions {versions[0]}..{versions[-1]}")
    print(f"dead letters found again at restarts: {rescanned} (batches that skipped re-sending some: "
          f"{prevented}); restarts that continued above a version published after their checkpoint: "
          f"{bumped}; committed {final_committed}")
    print(f"chaos test took {time.monotonic() - started:.0f}s")


# -- 2. a broker that is not there, then goes away and comes back --------------------

def cpu_share(pid: int, seconds: float) -> float:
    """CPU seconds the process used per wall second over ``seconds``."""
    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    return ((after.user - before.user) + (after.system - before.system)) / seconds


def create_topics(bootstrap: str, topics: Topics) -> None:
    ensure_topics(bootstrap, {topics.events: 3, topics.items: 1, topics.vectors: 3, topics.dlq: 1},
                  compacted={topics.items, topics.vectors})


def test_worker_waits_for_the_broker_without_spinning_and_recovers(unique_topic, tmp_path):
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    topics = Topics(unique_topic("events"), unique_topic("items"), unique_topic("vectors"),
                    unique_topic("dlq"), unique_topic("group"), unique_topic("forget"),
                    unique_topic("changelog"))  # forget and changelog: never created
    world = SyntheticWorld(n_items=60, n_users=40, seed=9)
    first = list(world.events(600, id_prefix=f"up-{uuid.uuid4().hex[:6]}"))
    bad = [malformed(i) for i in range(6)]
    later = list(world.events(90, id_prefix=f"back-{uuid.uuid4().hex[:6]}"))

    worker = launch(bootstrap, topics, tmp_path / "state", tmp_path / "worker.log", **FAST)
    broker = EmbeddedBroker(port=port)
    try:
        # Nothing listens: the worker keeps trying, counts it, logs it, and does not spin.
        m = worker.wait_for(lambda m: m.get("recstream_broker_errors_total", 0) >= 2, 300,
                            "failed attempts to reach Kafka")
        share = cpu_share(worker.proc.pid, 6.0)
        print(f"\nwaiting for a broker: {m['recstream_broker_errors_total']:.0f} failed attempts, "
              f"CPU {share:.1%} of a core")
        assert share < 0.25, f"the worker spins while waiting for Kafka ({share:.0%} of a core)"
        assert worker.proc.poll() is None
        assert "reaching Kafka at" in worker.tail(200)

        # The broker and the topics appear: it proceeds by itself.
        broker.start()
        create_topics(bootstrap, topics)
        produce_items(bootstrap, topics.items, world.items())
        produce_all(bootstrap, topics.events, [(e.user_id.encode(), event_to_json(e)) for e in first]
                    + [(b"bad-%d" % i, b) for i, b in enumerate(bad)])
        worker.wait_for(lambda m: m.get("recstream_events_valid_total", 0) >= len(first)
                        and m.get("recstream_pending_events", 1) == 0, 300, "the first events applied")

        # The broker goes away mid-run (tansu keeps everything in memory: it comes back empty).
        time.sleep(4)  # a checkpoint covers the first events
        errors_before = worker.metrics()["recstream_broker_errors_total"]
        broker.stop()
        time.sleep(3)
        share = cpu_share(worker.proc.pid, 6.0)
        print(f"broker gone: CPU {share:.1%} of a core")
        assert share < 0.25, f"the worker spins while Kafka is gone ({share:.0%} of a core)"
        assert worker.proc.poll() is None

        broker = EmbeddedBroker(port=port).start()
        create_topics(bootstrap, topics)
        produce_all(bootstrap, topics.events, [(e.user_id.encode(), event_to_json(e)) for e in later])
        m = worker.wait_for(lambda m: m.get("recstream_events_valid_total", 0) >= len(first) + len(later)
                            and m.get("recstream_pending_events", 1) == 0, 300,
                            "the events written after the broker came back applied")
        print(f"broker back: valid {m['recstream_events_valid_total']:.0f}, broker errors "
              f"{errors_before:.0f} -> {m['recstream_broker_errors_total']:.0f}")
        assert m["recstream_broker_errors_total"] > errors_before  # the outage was seen and counted
        code = worker.terminate()
        assert code == 0, worker.tail()
    finally:
        if worker.proc.poll() is None:
            worker.kill()
        broker.stop()
    totals = final_totals(tmp_path / "state")
    print(f"final totals: {totals}")
    assert totals["valid"] == len(first) + len(later) and totals["duplicates"] == 0
    assert totals["dead_lettered"] == len(bad)


# -- 3. two workers in one group --------------------------------------------------------

@pytest.mark.slow
def test_two_workers_split_the_partitions_exactly_once(bootstrap, unique_topic, tmp_path):
    """Worker b joins while a runs and events keep coming, then leaves (SIGTERM) while more come:
    each event is applied by exactly one of them, each bad record dead-lettered once."""
    started = time.monotonic()
    rng = random.Random(7)
    topics = make_topics(bootstrap, unique_topic, partitions=4)
    world = SyntheticWorld(n_items=120, n_users=200, seed=13)
    events = list(world.events(6000, id_prefix=f"reb-{uuid.uuid4().hex[:6]}"))
    records, bad, _ = hostile_stream(events, rng, bad_share=0.01, duplicate_share=0.0)
    first, middle, last = records[:2000], records[2000:4500], records[4500:]
    produce_items(bootstrap, topics.items, world.items())
    ends = produce_all(bootstrap, topics.events, first)

    committed = GroupOffsets(bootstrap, topics.group, topics.events)
    a = launch(bootstrap, topics, tmp_path / "a", tmp_path / "a.log", **FAST)
    b = None
    try:
        a.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= 1000, 600, "worker a under way")
        b = launch(bootstrap, topics, tmp_path / "b", tmp_path / "b.log", **FAST)
        b.wait_for(lambda m: m.get("recstream_partitions_assigned", 0) >= 1, 600, "worker b joined")
        for i in range(0, len(middle), 500):  # events keep coming while both run
            ends = merge_ends(ends, produce_all(bootstrap, topics.events, middle[i:i + 500]))
            time.sleep(2)
        b.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= 500, 600, "worker b under way")
        stopped(b, "term")  # b leaves; a takes its partitions over from b's commits
        ends = merge_ends(ends, produce_all(bootstrap, topics.events, last))
        a.wait_for(lambda m: m.get("recstream_pending_events", 1) == 0 and committed(ends) == ends, 600,
                   "every record consumed and committed")
        stopped(a, "term")
        final_committed = committed(ends)
    except BaseException:
        for w in (a, b):
            if w is not None and w.proc.poll() is None:
                w.kill()
        raise
    finally:
        committed.close()

    ta, tb = final_totals(tmp_path / "a"), final_totals(tmp_path / "b")
    rollbacks = log_count([tmp_path / "a.log", tmp_path / "b.log"], "going back to the last checkpoint")
    print(f"\nworker a: {ta}\nworker b: {tb}\nrollbacks after a revocation mid-experience: {rollbacks}")
    assert ta["valid"] > 0 and tb["valid"] > 0, "both workers must have had a share"
    assert ta["valid"] + tb["valid"] == len({e.event_id for e in events}) == len(events)
    assert ta["duplicates"] == tb["duplicates"] == 0
    assert ta["dead_lettered"] + tb["dead_lettered"] == len(bad)
    assert ta["consumed"] + tb["consumed"] == len(records)
    assert_dead_letters_exact(bootstrap, topics.dlq, bad)
    assert final_committed == ends == log_end_offsets(bootstrap, topics.events)
    print(f"rebalance test took {time.monotonic() - started:.0f}s")
