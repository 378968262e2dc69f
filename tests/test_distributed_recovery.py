"""A rank SIGKILLed mid-stream: torchrun restarts the group, which resumes as one model by itself.

Two ranks under ``torchrun --max-restarts 2`` on the embedded broker. Rank 1's worker is killed
twice while events stream in; before the second restart its newest checkpoint version is removed
too (what a kill mid-write leaves: the others hold a version it lacks), so rank 0 must go back to
the newest checkpoint turn both hold and the partitions it had committed further are read again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from learners.checkpoint import CheckpointStore, checkpoint_version
from learners.synthetic import SyntheticWorld
from stream.kafka.broker import log_end_offsets, read_topic
from stream.worker.group_restore import checkpoint_mark, held_marks
from worker_harness import (WorkerProcess, changelog_histories, committed_offsets, make_topics, produce_events,
                            produce_items, summed)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RANKS = 2


def _rank_pids(torchrun_pid: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (its children with RANK in their environment)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != torchrun_pid:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(entry.name)
    return out


def _wait(worker: WorkerProcess, predicate, timeout_s: float, what: str) -> list[dict[str, float]]:
    return worker.wait_for_ranks(RANKS, predicate, timeout_s, what, poll_s=0.3)


def _versions(state: Path, rank: int) -> list[int]:
    return CheckpointStore(state / f"rank-{rank}").complete_versions()


def _wait_for_versions(worker, state: Path, count: int, timeout_s: float) -> None:
    """Until both ranks hold ``count`` complete checkpoint versions in common."""
    deadline = time.monotonic() + timeout_s
    while len(set(_versions(state, 0)) & set(_versions(state, 1))) < count:
        assert time.monotonic() < deadline, f"checkpoints {_versions(state, 0)} / {_versions(state, 1)}"
        assert worker.proc.poll() is None, worker.tail(80)
        time.sleep(0.3)


def _event_offsets(path: Path) -> list:
    return json.loads((path / "extra.json").read_text())["event_offsets"]


def _wait_for_a_step_back(worker, state: Path, timeout_s: float, committed, feed) -> Path:
    """A checkpoint of rank 1 that holds fewer events than its newest, at a version and group turn
    rank 0 has too, once rank 1's partitions are committed past it (``committed()``: partition ->
    offset): without the newer ones rank 0 must go back to it, and the partitions committed past it
    are read again. ``feed()`` sends a few more events each poll, so that the stream never drains
    (a drained group writes no newer checkpoint)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert worker.proc.poll() is None, worker.tail(80)
        feed()
        paths = CheckpointStore(state / "rank-1").checkpoints()
        try:
            older = [p for p in paths if _event_offsets(p) != _event_offsets(paths[0])]
            if older and checkpoint_mark(older[0]) in held_marks(state / "rank-0") \
                    and checkpoint_version(older[0]) < checkpoint_version(paths[0]):
                # Where the group's model is at that checkpoint (a partition this rank took over
                # after it is named there by its previous owner's offset, not by this rank's).
                extra = json.loads((older[0] / "extra.json").read_text())
                held: dict[int, int] = {}
                for _, p, o in extra["group_offsets"] + extra["event_offsets"]:
                    held[p] = max(o, held.get(p, 0))
                commits = committed()
                if any((commits.get(p) or 0) > held.get(p, 0) for _, p, _ in _event_offsets(paths[0])):
                    return older[0]
        except (OSError, IndexError, KeyError, ValueError):
            pass  # a folder pruned while read
        assert time.monotonic() < deadline, f"checkpoints {_versions(state, 0)} / {_versions(state, 1)}"
        time.sleep(0.3)


def _histories_differ(held: dict, expected: dict, log_text: str) -> str:
    """Where the changelog's histories part from the events, and the group's moves, to read a failure by."""
    lines = []
    for user in sorted(expected.keys() | held.keys()):
        mine, theirs = held.get(user, ()), expected.get(user, ())
        if mine != theirs:
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            lines.append(f"{user}: {len(mine)} items held, {len(theirs)} sent; first differs at {at}: "
                         f"{mine[at:at + 4]} held, {theirs[at:at + 4]} sent")
    moves = [line for line in log_text.splitlines()
             if re.search(r"assigned|revoked|starts at|reading (again|on)|read (again|on)|going back|resumed", line)]
    return "\n".join([f"{len(lines)} users differ"] + lines[:12] + ["the group's moves:"] + moves[-60:])


def _final_extra(state: Path, rank: int) -> dict:
    return CheckpointStore(state / f"rank-{rank}").latest_extra()


def _kill_rank_1(worker: WorkerProcess) -> int:
    pids = _rank_pids(worker.proc.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGKILL)
    return pids[1]


def _wait_for_restart(worker: WorkerProcess, killed: int, timeout_s: float) -> None:
    """Until torchrun runs a fresh pair of ranks (the killed pid gone) and both serve metrics."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert worker.proc.poll() is None, f"torchrun exited ({worker.proc.returncode}):\n{worker.tail(80)}"
        pids = _rank_pids(worker.proc.pid)
        if sorted(pids) == [0, 1] and killed not in pids.values() and all(worker.rank_metrics(RANKS)):
            return
        assert time.monotonic() < deadline, f"no restart; ranks {pids}\n{worker.tail(80)}"
        time.sleep(0.3)


def _committed(bootstrap: str, topics) -> dict[int, int]:
    return committed_offsets(bootstrap, topics.group, topics.events, range(4))


def test_a_rank_killed_mid_stream_and_behind_a_version_the_group_recovers_by_itself(broker, unique_topic, tmp_path):
    topics = make_topics(broker.bootstrap, unique_topic, partitions=4)
    world = SyntheticWorld(n_items=120, n_users=80, seed=9)
    produce_items(broker.bootstrap, topics.items, world.items())
    events = list(world.events(3000, id_prefix=f"k-{uuid.uuid4().hex[:6]}"))
    chunks = [events[:1000], events[1000:2200], events[2200:]]
    state = tmp_path / "state"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
                "--max-restarts=2", "--monitor-interval=0.5", "-m", "stream.cli", "worker", "--distributed", "true"]
    worker = WorkerProcess(broker.bootstrap, topics, state, tmp_path / "group.log", command=torchrun,
                           experience_size=200, max_experience_wait_s=1, checkpoint_interval_s=1,
                           first_checkpoint_s=0.5, batch_size=64, negatives=32, torch_threads=1,
                           progress_interval_s=5)
    try:
        _wait(worker, lambda ranks: all(m.get("recstream_partitions_assigned") == 2 for m in ranks), 120,
              "both ranks in the group with two partitions each")
        produce_events(broker.bootstrap, topics.events, chunks[0])
        _wait(worker, lambda ranks: summed(ranks, "recstream_events_consumed_total") >= 500, 60, "events flowing")
        _wait_for_versions(worker, state, 2, 60)
        killed = _kill_rank_1(worker)  # mid-stream: the rest of the chunk still waits
        _wait_for_restart(worker, killed, 90)

        unsent = list(chunks[1])

        def feed(count: int = 20) -> None:
            if unsent:
                produce_events(broker.bootstrap, topics.events, unsent[:count])
                del unsent[:count]

        feed(400)
        # (counters count this attempt's records: a restarted rank's start at 0)
        _wait(worker, lambda ranks: all(m.get("recstream_events_consumed_total", 0) >= 100 for m in ranks), 90,
              "events flowing to both ranks after the first restart")
        step_back = _wait_for_a_step_back(worker, state, 90, lambda: _committed(broker.bootstrap, topics), feed)
        killed = _kill_rank_1(worker)
        # What a kill mid-write leaves: rank 1 lacks the newest checkpoints rank 0 holds.
        paths = CheckpointStore(state / "rank-1").checkpoints()
        assert step_back in paths, (step_back, paths)
        for path in paths[:paths.index(step_back)]:
            shutil.rmtree(path)
        _wait_for_restart(worker, killed, 90)

        produce_events(broker.bootstrap, topics.events, unsent + chunks[2])
        ends = log_end_offsets(broker.bootstrap, topics.events)
        deadline = time.monotonic() + 120
        while _committed(broker.bootstrap, topics) != ends:  # lag 0: the group committed every event
            assert time.monotonic() < deadline, f"committed {_committed(broker.bootstrap, topics)} != {ends}"
            assert worker.proc.poll() is None, worker.tail(80)
            time.sleep(0.5)
        ranks = _wait(worker, lambda ranks: all(m.get("recstream_pending_events", 1) == 0 for m in ranks), 60,
                      "everything trained")  # these ranks' counters: of this last attempt
        assert worker.proc.poll() is None  # torchrun still runs the group
        worker.terminate(timeout_s=90)
    except BaseException:
        for pid in _rank_pids(worker.proc.pid).values():  # killing torchrun alone would orphan them
            os.kill(pid, signal.SIGKILL)
        worker.kill()
        raise
    log_text = (tmp_path / "group.log").read_text(errors="replace")

    # Nothing applied twice to a rank's state (its de-duplication would have counted it), and the
    # group's last checkpoints hold every partition to its end.
    assert sum(_final_extra(state, r)["totals"]["duplicates"] for r in range(RANKS)) == 0
    # Every event in one rank's state exactly once: the checkpoints' accounting, which goes back
    # with them, counts each event the group's model holds.
    assert sum(_final_extra(state, r)["totals"]["valid"] for r in range(RANKS)) == len(events)
    covered = [dict(((t, p), o) for t, p, o in _final_extra(state, r)["group_offsets"]) for r in range(RANKS)]
    assert {p: max(c.get((topics.events, p), 0) for c in covered) for p in ends} == ends
    assert sum(ends.values()) == len(events)
    # Rank 0 went back to the checkpoint of the turn both held, said so and counted it, and the
    # records the group gave up were read again.
    assert re.search(r"going back to checkpoint ckpt-\d+-\d+ \(model version \d+\), the newest every rank has "
                     r"complete", log_text), log_text[-6000:]
    assert re.search(r"reading again from offset \d+", log_text), log_text[-6000:]
    assert summed(ranks, "recstream_checkpoint_restore_rollbacks_total") == 1  # rank 0, once
    assert "RanksDisagree" not in log_text and "the ranks restored different models" not in log_text

    # The same weights on both ranks at the end, bit for bit.
    digests = re.findall(r"rank (\d) of 2: model v(\d+), weights sha256 (\w+), the same on every rank", log_text)
    last = {rank: (version, digest) for rank, version, digest in digests}
    assert sorted(last) == ["0", "1"] and len(set(last.values())) == 1, log_text[-4000:]
    assert "weights differ across ranks" not in log_text

    # model_version never goes back: per key (one key, one partition, in order), and every user has a vector.
    seen: dict[bytes, int] = defaultdict(int)
    for record in read_topic(broker.bootstrap, topics.vectors):
        if record.value is None:
            continue
        version = json.loads(record.value)["payload"]["model_version"]
        assert version >= seen[record.key], (record.key, version, seen[record.key])
        seen[record.key] = version
    assert {key.decode()[5:] for key in seen if key.startswith(b"user:")} == {e.user_id for e in events}

    # Whichever rank held a user's partition last, and however often it moved or went back, the
    # user's history is all their events, each once, in order: what one process would hold.
    history: dict[str, list[str]] = defaultdict(list)
    for event in events:
        history[event.user_id].append(event.item_id)
    expected = {u: tuple(h[-256:]) for u, h in history.items()}
    held = changelog_histories(broker.bootstrap, topics.changelog)
    assert held == expected, _histories_differ(held, expected, log_text)
