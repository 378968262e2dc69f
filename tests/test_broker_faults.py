"""Broker and disk faults under a running worker, on a broker that keeps its data.

The broker is the embedded tansu on S3 storage (moto's S3 server,
tests/durable_broker.py): SIGKILLed and started again it still holds every
record and committed offset, as a real cluster's broker does, so the worker
must pick up where it was rather than find an empty cluster. The state dir
sits on a small tmpfs that the test fills up mid-run.

The verdict comes from the worker's own accounting in its last checkpoint
(``Totals``, as in tests/test_chaos.py), the group's committed offsets and the
topics themselves.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from durable_broker import DurableBroker, MotoS3, S3Unavailable
from learners.checkpoint import CheckpointStore
from learners.records import event_to_json
from learners.synthetic import SyntheticWorld
from stream.kafka.broker import log_end_offsets, read_topic
from stream.kafka.recovery import PublishedVersionMark, StateDirError
from test_chaos import FAST, GroupOffsets, final_totals, latest_vectors, launch, merge_ends, produce_all, stopped
from worker_fakes import TP0, consumer_record, event_bytes, gauge, make_worker, skip_checkpoint_files
from worker_harness import make_topics, produce_items

# Twice the harness's group session timeout (RECSTREAM_SESSION_TIMEOUT_MS in tests/worker_harness.py).
FROZEN_S = 2 * 6.0


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server for this module's brokers (one bucket each)."""
    server = MotoS3(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        server.start()
    except S3Unavailable as exc:
        pytest.skip(f"no S3 endpoint for a durable broker: {exc}")
    yield server
    server.stop()


@pytest.fixture
def durable_broker(s3, tmp_path):
    """A tansu broker on its own bucket that the test may kill, freeze and start again."""
    broker = DurableBroker(s3, tmp_path / "tansu.log").start()
    yield broker
    broker.stop()


def encoded(events) -> list[tuple[bytes, bytes]]:
    return [(e.user_id.encode(), event_to_json(e)) for e in events]


def assert_versions_never_go_back(vector_records) -> list[int]:
    """The model version of each vectors partition, in log order, only goes up; returns them all."""
    by_partition = defaultdict(list)
    for record in vector_records:
        by_partition[record.partition].append(json.loads(record.value)["payload"]["model_version"])
    for partition, versions in by_partition.items():
        backwards = [(a, b) for a, b in zip(versions, versions[1:]) if b < a]
        assert not backwards, f"vectors partition {partition}: model_version went back {backwards[:5]}"
    return sorted({v for vs in by_partition.values() for v in vs})


def assert_exactly_once(bootstrap: str, topics, state_dir: Path, events, ends: dict, committed: dict) -> dict:
    """Every event applied once, committed to the log's end, no dead letter, every user a vector."""
    totals = final_totals(state_dir)
    assert totals["valid"] == len(events) and totals["consumed"] == len(events), totals
    assert totals["duplicates"] == 0 and totals["dead_lettered"] == 0, totals
    assert committed == ends == log_end_offsets(bootstrap, topics.events)
    assert read_topic(bootstrap, topics.dlq) == [], "nothing may be dead-lettered"
    vectors = read_topic(bootstrap, topics.vectors)
    users = {key[5:] for key in latest_vectors(vectors) if key.startswith("user:")}
    assert users >= {e.user_id for e in events}, "every user must have a vector"
    versions = assert_versions_never_go_back(vectors)
    print(f"totals {totals}; {len(vectors)} vectors, model versions {versions[0]}..{versions[-1]}")
    return totals


def new_stream(seed: int, n_events: int):
    world = SyntheticWorld(n_items=60, n_users=80, seed=seed)
    return world.items(), list(world.events(n_events, id_prefix=f"fault-{uuid.uuid4().hex[:8]}"))


def drained(worker, committed: GroupOffsets, ends: dict):
    """Wait until the worker has applied, trained and committed everything up to ``ends``."""
    return worker.wait_for(lambda m: m.get("recstream_pending_events", 1) == 0 and committed(ends) == ends, 300,
                           f"every record up to {ends} consumed, trained and committed")


# -- 1. the broker SIGKILLed twice, back after 20 s -------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_broker_killed_twice_under_a_running_worker_loses_and_doubles_nothing(durable_broker, unique_topic,
                                                                              tmp_path):
    started = time.monotonic()
    bootstrap = durable_broker.bootstrap
    topics = make_topics(bootstrap, unique_topic)
    items, events = new_stream(seed=31, n_events=1800)
    parts = [events[:600], events[600:1200], events[1200:]]
    produce_items(bootstrap, topics.items, items)
    ends = produce_all(bootstrap, topics.events, encoded(parts[0]))
    state_dir = tmp_path / "state"
    worker = launch(bootstrap, topics, state_dir, tmp_path / "worker.log", **FAST)
    committed = None
    try:
        consumed = 0.0
        for n, part in enumerate(parts[1:], start=1):
            # Killed mid-stream: records read but not yet trained, checkpointed or committed.
            m = worker.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= consumed + 200, 300,
                                "the worker under way")
            consumed = m["recstream_events_consumed_total"]
            durable_broker.kill()
            print(f"\nbroker SIGKILL {n} after {consumed:.0f} records consumed")
            time.sleep(20)
            assert worker.proc.poll() is None, f"the worker died with the broker:\n{worker.tail()}"
            durable_broker.start()
            ends = merge_ends(ends, produce_all(bootstrap, topics.events, encoded(part)))
        committed = GroupOffsets(bootstrap, topics.group, topics.events)
        m = drained(worker, committed, ends)
        print(f"broker errors seen by the worker: {m.get('recstream_broker_errors_total', 0):.0f}")
        stopped(worker, "term")
        final_committed = committed(ends)
    finally:
        if worker.proc.poll() is None:
            worker.kill()
        if committed is not None:
            committed.close()
    assert_exactly_once(bootstrap, topics, state_dir, events, ends, final_committed)
    print(f"broker-kill test took {time.monotonic() - started:.0f}s")


# -- 2. the broker frozen past the session timeout -----------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_broker_frozen_past_the_session_timeout_loses_and_doubles_nothing(durable_broker, unique_topic, tmp_path):
    """Frozen, the broker answers nothing while its connections stay open: requests time out and the
    client's session expires on its side. tansu keeps the member when it resumes (its rebalance count
    stays put); a broker that evicts it sends the worker through the rejoin the rebalance tests cover.
    Either way the worker must hold its partitions again and apply every event once."""
    started = time.monotonic()
    bootstrap = durable_broker.bootstrap
    topics = make_topics(bootstrap, unique_topic)
    items, events = new_stream(seed=37, n_events=1200)
    produce_items(bootstrap, topics.items, items)
    ends = produce_all(bootstrap, topics.events, encoded(events[:700]))
    state_dir = tmp_path / "state"
    worker = launch(bootstrap, topics, state_dir, tmp_path / "worker.log", **FAST)
    committed = None
    try:
        m = worker.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= 300, 300, "the worker under way")
        rebalances, errors = m.get("recstream_rebalances_total", 0), m.get("recstream_broker_errors_total", 0)
        durable_broker.freeze()
        time.sleep(FROZEN_S)
        durable_broker.thaw()
        assert worker.proc.poll() is None, f"the worker died while the broker was frozen:\n{worker.tail()}"
        ends = merge_ends(ends, produce_all(bootstrap, topics.events, encoded(events[700:])))
        committed = GroupOffsets(bootstrap, topics.group, topics.events)
        m = drained(worker, committed, ends)
        print(f"\nbroker frozen {FROZEN_S:.0f}s after 300+ records; rebalances "
              f"{rebalances:.0f} -> {m.get('recstream_rebalances_total', 0):.0f}, broker errors "
              f"{m.get('recstream_broker_errors_total', 0):.0f}, partitions {m.get('recstream_partitions_assigned')}")
        assert m.get("recstream_partitions_assigned") == 3, "the worker must hold its partitions again"
        assert m.get("recstream_broker_errors_total", 0) > errors, "the frozen broker must be seen and counted"
        stopped(worker, "term")
        final_committed = committed(ends)
    finally:
        if worker.proc.poll() is None:
            worker.kill()
        if committed is not None:
            committed.close()
    assert_exactly_once(bootstrap, topics, state_dir, events, ends, final_committed)
    print(f"broker-freeze test took {time.monotonic() - started:.0f}s")


# -- 3. the state dir full (or read-only) mid-run ----------------------------------------

STATE_FS_BYTES = 400 * 2**20  # a few checkpoints of the real model (about 100 MB each, mostly hard-linked)


class FullDisk:
    """The state dir on a small tmpfs of its own (root's ``mount``), filled up by one big file."""

    what = "full"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.filler = state_dir / ".filler"

    def mount(self) -> str:
        """'' once mounted, else why it cannot be."""
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STATE_FS_BYTES},mode=0755", "tmpfs",
                               str(self.state_dir)], capture_output=True, text=True)
        return "" if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")

    def inject(self) -> None:
        chunk = b"\0" * 2**20
        with open(self.filler, "wb") as fh:
            try:
                while True:
                    fh.write(chunk)
                    fh.flush()
            except OSError:
                pass

    def clear(self) -> None:
        self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.state_dir)], check=False)


class ReadOnlyDir:
    """The state dir made read-only by its mode bits (binding for any user but root)."""

    what = "read-only"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def inject(self) -> None:
        self.state_dir.chmod(0o555)

    def clear(self) -> None:
        self.state_dir.chmod(0o755)


@pytest.fixture
def state_dir_fault(tmp_path):
    """A state dir the test can make unwritable: full (a tmpfs, as root) or read-only (as any other user)."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if os.geteuid() != 0:
        fault = ReadOnlyDir(state_dir)
        yield fault
        fault.clear()
        return
    fault = FullDisk(state_dir)
    why = fault.mount()
    if why:
        pytest.skip(f"root cannot mount a small tmpfs for the state dir here ({why}), and mode bits do not "
                    "bind root: no way to make the state dir unwritable")
    try:
        yield fault
    finally:
        fault.unmount()


@pytest.mark.integration
@pytest.mark.slow
def test_state_dir_unwritable_mid_run_stops_clearly_and_commits_nothing_past_the_durable(
        broker, unique_topic, state_dir_fault, tmp_path):
    """Checkpoints fail (counted, logged, nothing committed past the last durable one) and at the next
    model update the worker stops, saying what to do: no vector of a version may go out before its mark is
    on disk. Restarted once the dir is writable again, it loses and repeats nothing."""
    started = time.monotonic()
    bootstrap, state_dir = broker.bootstrap, state_dir_fault.state_dir
    topics = make_topics(bootstrap, unique_topic)
    items, events = new_stream(seed=41, n_events=1400)
    produce_items(bootstrap, topics.items, items)
    base = 2 * FAST["experience_size"]  # trained to the last event: no experience in flight at the fault
    ends = produce_all(bootstrap, topics.events, encoded(events[:base]))
    logs = [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
    # Training waits for a full experience, so the checkpoints due meanwhile fail first.
    worker = launch(bootstrap, topics, state_dir, logs[0], **{**FAST, "max_experience_wait_s": 600})
    committed = GroupOffsets(bootstrap, topics.group, topics.events)
    try:
        drained(worker, committed, ends)
        state_dir_fault.inject()
        ends = merge_ends(ends, produce_all(bootstrap, topics.events, encoded(events[base:base + 100])))
        m = worker.wait_for(lambda m: m.get("recstream_checkpoint_failures_total", 0) >= 2
                            and m.get("recstream_events_consumed_total", 0) >= base + 100, 120,
                            "checkpoints failing while the state dir is unwritable")
        durable = {p: o for _, p, o in CheckpointStore(state_dir).latest_extra()["event_offsets"]}
        held = committed(ends)
        print(f"\nstate dir {state_dir_fault.what}: {m['recstream_checkpoint_failures_total']:.0f} checkpoint "
              f"failures; committed {held}, last durable checkpoint {durable}, log ends {ends}")
        assert held == {p: durable.get(p) for p in held}, "committed past the last durable checkpoint"
        assert held != ends, "records applied after the dir became unwritable must not be committed"
        assert "checkpoint failed, offsets stay uncommitted" in worker.tail(100)

        # A model update: its vectors cannot go out before its version is on disk, so the worker stops.
        ends = merge_ends(ends, produce_all(bootstrap, topics.events, encoded(events[base + 100:1000])))
        code = worker.proc.wait(timeout=300)
        worker.close_log()
        said = worker.tail(30)
        print(f"then exit {code}: " + "".join(line for line in said.splitlines() if line.startswith("Error")))
        assert code == 1, f"expected a stop with a message, got exit {code}:\n{said}"
        assert "Error: cannot record model version" in said and "start the worker again" in said
        assert "Traceback" not in said
        assert committed(ends) == held

        state_dir_fault.clear()
        worker = launch(bootstrap, topics, state_dir, logs[1], **FAST)
        ends = merge_ends(ends, produce_all(bootstrap, topics.events, encoded(events[1000:])))
        drained(worker, committed, ends)
        stopped(worker, "term")
        final_committed = committed(ends)
    finally:
        if worker.proc.poll() is None:
            worker.kill()
        committed.close()
    assert_exactly_once(bootstrap, topics, state_dir, events, ends, final_committed)
    print(f"unwritable-state-dir test took {time.monotonic() - started:.0f}s")


# -- the same rules on fakes (fast) --------------------------------------------------------

def no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_that_cannot_be_written_is_counted_and_commits_nothing(tmp_path):
    batch = {TP0: [consumer_record(i, event_bytes(i)) for i in range(5)]}
    worker, consumer, _ = make_worker(tmp_path, [batch])
    skip_checkpoint_files(worker)
    worker.checkpointer.store.write = no_space
    worker.turn()
    assert not worker.checkpoint()
    assert gauge(worker.metrics.checkpoint_failures) == 1 and consumer.commits == []
    skip_checkpoint_files(worker)  # space again: the next checkpoint holds the same records and commits them
    assert worker.checkpoint()
    assert consumer.commits[-1][TP0].offset == 5


def test_a_published_version_that_cannot_be_recorded_stops_with_what_to_do(tmp_path, monkeypatch):
    mark = PublishedVersionMark(tmp_path / "state")
    mark.advance(3)
    monkeypatch.setattr(mark, "_write", no_space)
    with pytest.raises(StateDirError, match="free space in .* or make it writable, then start the worker again"):
        mark.advance(4)
    assert mark.value == 3 and PublishedVersionMark(tmp_path / "state").value == 3
