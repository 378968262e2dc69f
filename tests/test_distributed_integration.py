"""Two ranks under torchrun, one consumer group, one model: the whole path on the embedded broker."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from learners.checkpoint.manifest import read_manifest
from learners.checkpoint.store import checkpoint_folders, checkpoint_version
from learners.synthetic import SyntheticWorld
from stream.kafka.broker import log_end_offsets, read_topic
from worker_harness import (WorkerProcess, changelog_histories, committed_offsets, make_topics, produce_events,
                            produce_items, summed)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RANKS = 2


def test_two_ranks_train_one_model(broker, unique_topic, tmp_path):
    topics = make_topics(broker.bootstrap, unique_topic, partitions=4)
    world = SyntheticWorld(n_items=120, n_users=80, seed=5)
    described = world.items()[:100]  # 20 items only named by events: rows agreed from events alone
    events = list(world.events(1500, id_prefix=f"d-{uuid.uuid4().hex[:6]}"))
    produce_items(broker.bootstrap, topics.items, described)

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
                "-m", "stream.cli", "worker", "--distributed", "true"]
    worker = WorkerProcess(broker.bootstrap, topics, tmp_path / "state", tmp_path / "group.log", command=torchrun,
                           experience_size=256, max_experience_wait_s=2, checkpoint_interval_s=5, batch_size=64,
                           negatives=64, torch_threads=1, progress_interval_s=5)
    try:
        # Events only once both ranks hold their partitions: handing over partitions that already
        # have state is tests/test_partition_handover.py's subject.
        worker.wait_for_ranks(
            RANKS, lambda ranks: all(m.get("recstream_partitions_assigned") == 4 / RANKS for m in ranks),
            120, "both ranks in the group with two partitions each")
        produce_events(broker.bootstrap, topics.events, events)
        ranks = worker.wait_for_ranks(
            RANKS, lambda ranks: summed(ranks, "recstream_events_consumed_total") >= len(events)
            and all(m.get("recstream_pending_events", 1) == 0 for m in ranks)
            and min(m.get("recstream_model_version", 0) for m in ranks) >= 2, 240,
            "all events consumed and trained")
        worker.terminate(timeout_s=90)  # torchrun hands SIGTERM to every rank: they drain together
    except BaseException:
        worker.kill()
        raise
    log_text = Path(tmp_path / "group.log").read_text(errors="replace")

    # Each rank consumed its own partitions; together every event once, all trained (none shed).
    assert all(m.get("recstream_events_consumed_total", 0) > 0 for m in ranks), ranks
    assert summed(ranks, "recstream_events_consumed_total") == len(events)
    assert summed(ranks, "recstream_events_valid_total") == len(events)
    assert summed(ranks, "recstream_train_samples_shed_total") == 0
    assert "going back to the last checkpoint" not in log_text
    versions = {m["recstream_model_version"] for m in ranks}
    assert len(versions) == 1, ranks  # one model version sequence

    # The same weights on both ranks at the end, bit for bit.
    assert "weights differ across ranks" not in log_text
    digests = re.findall(r"rank (\d) of 2: model v(\d+), weights sha256 (\w+), the same on every rank", log_text)
    last = {rank: (version, digest) for rank, version, digest in digests}  # at start, then after the drain
    assert sorted(last) == ["0", "1"] and len(set(last.values())) == 1, log_text[-4000:]
    assert int(last["0"][0]) >= versions.pop()

    # Every user has a vector; an item's vector goes out once per model version (rank 0 only).
    vectors = read_topic(broker.bootstrap, topics.vectors)
    users = {r.key.decode()[5:] for r in vectors if r.key.startswith(b"user:")}
    assert users == {e.user_id for e in events}
    item_versions = Counter((r.key.decode(), json.loads(r.value)["payload"]["model_version"])
                            for r in vectors if r.key.startswith(b"item:") and r.value is not None)
    assert item_versions and max(item_versions.values()) == 1, item_versions.most_common(3)
    items_out = {key[5:] for key, _ in item_versions}
    assert items_out >= {i.item_id for i in described}

    # Every user's history is in the changelog as their events came, for a partition's next owner.
    history: dict[str, list[str]] = {}
    for event in events:
        history.setdefault(event.user_id, []).append(event.item_id)
    assert changelog_histories(broker.bootstrap, topics.changelog) == {u: tuple(h[-256:]) for u, h in history.items()}

    # The group committed every partition to its end.
    ends = log_end_offsets(broker.bootstrap, topics.events)
    committed = committed_offsets(broker.bootstrap, topics.group, topics.events, ends)
    assert committed == ends and sum(ends.values()) == len(events)
    # Each rank checkpoints into a state dir of its own, and the group's model is stored once a round:
    # what rank 1's checkpoint holds identically to rank 0's of the same version is rank 0's file.
    assert all(any((tmp_path / "state" / f"rank-{r}").glob("ckpt-*")) for r in range(RANKS))
    same_version = [(ours, theirs) for ours in checkpoint_folders(tmp_path / "state" / "rank-1")
                    for theirs in checkpoint_folders(tmp_path / "state" / "rank-0")
                    if checkpoint_version(ours) == checkpoint_version(theirs)]
    assert same_version
    ours, theirs = same_version[0]
    mine, rank0 = read_manifest(ours), read_manifest(theirs)
    identical = sorted(name for name, entry in mine.items() if rank0.get(name) == entry)
    assert {"learner.safetensors", "optimizer.safetensors", "ewc.safetensors"} <= set(identical), identical
    # Nothing of it written again by rank 1: each is rank 0's file, or rank 1's previous one unchanged.
    assert all(os.stat(ours / name).st_nlink >= 2 for name in identical), identical
    assert os.path.samefile(ours / "learner.safetensors", theirs / "learner.safetensors")


def _torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "stream.cli", "worker", "--distributed", "true"]


_FAST = dict(experience_size=128, max_experience_wait_s=1, checkpoint_interval_s=3, torch_threads=1)


def _small_stream(broker, unique_topic, seed: int, prefix: str):
    """Four partitions, a small world's items, and its events (not yet produced)."""
    topics = make_topics(broker.bootstrap, unique_topic, partitions=4)
    world = SyntheticWorld(n_items=60, n_users=30, seed=seed)
    produce_items(broker.bootstrap, topics.items, world.items())
    return topics, list(world.events(400, id_prefix=f"{prefix}-{uuid.uuid4().hex[:6]}"))


def _run_group(broker, topics, tmp_path, ranks: int, log_name: str, events=(), until=None, what: str = "",
               killed: bool = False) -> list:
    """A group of ``ranks`` on ``tmp_path / "state"``: once every rank holds its share of the four
    partitions, ``events`` are produced; it runs until ``until(metrics)`` (if given), then drains
    (SIGTERM), or is SIGKILLed once every rank's newest checkpoint holds the whole group at the end
    of the events topic and the group has committed it (``killed``: a checkpoint all ranks took
    after the last event; commits follow checkpoints, so under load they may come a moment later)."""
    group = WorkerProcess(broker.bootstrap, topics, tmp_path / "state", tmp_path / log_name,
                          command=_torchrun(ranks), **_FAST)
    try:
        metrics = group.wait_for_ranks(ranks, lambda r: all(m.get("recstream_partitions_assigned") == 4 / ranks
                                                            for m in r), 120, f"{ranks} rank(s) assigned")
        if events:
            produce_events(broker.bootstrap, topics.events, events)
        if until is not None:
            metrics = group.wait_for_ranks(ranks, until, 180, what)
        if not killed:
            group.terminate(timeout_s=90)
            return metrics
        ends = {(topics.events, p): end for p, end in log_end_offsets(broker.bootstrap, topics.events).items()}
        deadline = time.monotonic() + 60
        while not (all(_group_offsets(tmp_path / "state" / f"rank-{r}") == ends for r in range(ranks))
                   and _committed(broker, topics) == ends):
            assert time.monotonic() < deadline, "no checkpoint of the whole group covers every event, committed"
            time.sleep(1)
    except BaseException:
        group.kill()
        raise
    group.kill()
    return metrics


def _committed(broker, topics) -> dict:
    committed = committed_offsets(broker.bootstrap, topics.group, topics.events, range(4))
    return {(topics.events, p): offset for p, offset in committed.items()}


def _group_offsets(state_dir: Path) -> dict:
    """Where the newest checkpoint in ``state_dir`` says the group's model is on every partition."""
    for folder in checkpoint_folders(state_dir):
        extra = folder / "extra.json"
        if extra.is_file():
            return {(t, p): o for t, p, o in json.loads(extra.read_text()).get("group_offsets", [])}
    return {}


def _all_trained(count: int):
    return lambda ranks: summed(ranks, "recstream_events_consumed_total") >= count and all(
        m.get("recstream_pending_events", 1) == 0 for m in ranks)


def test_a_rank_that_joins_a_grown_group_starts_from_rank_0s_model(broker, unique_topic, tmp_path):
    """One rank, then two: the new rank has no checkpoint and takes rank 0's newest version (the
    group's checkpoints cover every partition, so nothing is read again), the same weights."""
    topics, events = _small_stream(broker, unique_topic, seed=8, prefix="g")
    _run_group(broker, topics, tmp_path, 1, "one.log", events, _all_trained(len(events)), "all events trained")
    _run_group(broker, topics, tmp_path, RANKS, "two.log")
    text = (tmp_path / "two.log").read_text(errors="replace")
    assert "rank 1 joins a group of 1" in text and "rank 1 starts from rank 0's ckpt-" in text, text[-3000:]
    assert "behind its commits" not in text and "reading again from offset" not in text, text[-3000:]
    digests = re.findall(r"rank (\d) of 2: model v(\d+), weights sha256 (\w+), the same on every rank", text)
    first, last = {}, {}
    for rank, version, digest in digests:  # at start, then after the drain
        first.setdefault(rank, (version, digest))
        last[rank] = (version, digest)
    assert sorted(last) == ["0", "1"] and len(set(first.values())) == 1 and len(set(last.values())) == 1, text[-3000:]


def test_a_group_that_shrinks_reads_nothing_again_that_its_model_learned(broker, unique_topic, tmp_path):
    """Two ranks, then one: the ranks share their offsets whenever all of them checkpoint, so rank 0
    alone knows that the group's model holds rank 1's partitions up to their commits, and takes
    its users' histories from the changelog instead of training on their events a second time.
    (The group is killed once committed, as a removed pod would be.)"""
    topics, events = _small_stream(broker, unique_topic, seed=9, prefix="s")
    # Killed rather than drained: the embedded broker keeps a group's leader as a member when the
    # whole group leaves at once, and the next member's SyncGroup then never completes. What came
    # after the last checkpoint all ranks took is read again, rightly: so killed only after one.
    _run_group(broker, topics, tmp_path, RANKS, "two.log", events, _all_trained(len(events)), "all events trained",
               killed=True)
    ranks = _run_group(broker, topics, tmp_path, 1, "one.log",
                       until=lambda r: r[0].get("recstream_users_adopted_total", 0) > 0,
                       what="rank 0 alone, with rank 1's users adopted")
    text = (tmp_path / "one.log").read_text(errors="replace")
    assert "behind its commits" not in text and "reading again from offset" not in text, text[-3000:]
    assert ranks[0].get("recstream_events_consumed_total", 0) == 0, ranks


def test_a_rank_without_checkpoints_in_the_recorded_group_starts_from_the_groups_model(broker, unique_topic,
                                                                                     tmp_path):
    """Rank 1's folder is gone (or its first start was cut short before it wrote one): it starts
    from rank 0's checkpoint instead of keeping the group down, with the same weights, and the
    group's checkpoints name every partition's offset, so nothing is read again. (Killed, not
    drained, for the embedded broker's sake: see the test above.)"""
    topics, events = _small_stream(broker, unique_topic, seed=10, prefix="l")
    _run_group(broker, topics, tmp_path, RANKS, "first.log", events, _all_trained(len(events)),
               "all events trained", killed=True)
    shutil.rmtree(tmp_path / "state" / "rank-1")
    ranks = _run_group(broker, topics, tmp_path, RANKS, "again.log")
    text = (tmp_path / "again.log").read_text(errors="replace")
    assert "rank 1 of the group of 2 that wrote the checkpoints holds none" in text, text[-3000:]
    assert "rank 1 starts from rank 0's ckpt-" in text and "RanksDisagree" not in text, text[-3000:]
    digests = re.findall(r"rank (\d) of 2: model v(\d+), weights sha256 (\w+), the same on every rank", text)
    first, last = {}, {}
    for rank, version, digest in digests:  # at start (each rank's restored version), then after the drain
        first.setdefault(rank, digest)
        last[rank] = (version, digest)
    assert sorted(first) == ["0", "1"] and len(set(first.values())) == 1, text[-3000:]
    assert len(set(last.values())) == 1, text[-3000:]  # one version sequence once started
    assert summed(ranks, "recstream_events_consumed_total") == 0, ranks  # read on, none again
