"""Ingest: the worker's events/s with training paused, next to bare kafka-python.

Both sides read the same pre-produced topic from the beginning with a fresh
consumer group and the same ``max_poll_records`` and ``fetch_max_wait_ms``. The clock starts when the
first batch has been handled (so joining the group is not counted) and stops
when the last record has been handled:

* ``bare``: ``poll()`` and ``json.loads`` of every value.
* ``bare_produce``: that, plus one record of the worker's output shape per
  touched user and publish window (stream/bench/bare_produce.py): the
  reference ``worker_publish`` is a ratio of (``publish_ratio``).
* ``worker``: ``Worker.turn()`` exactly as in production -- consume, validate,
  de-duplicate, apply to user state, count -- with training never due;
  ``worker_publish`` also publishes the touched users' vectors (the production
  path: once per 50 ms window, handed to the producer, all acknowledged before
  the final checkpoint, which is timed apart); ``worker`` skips that
  publishing, so it isolates the per-event work.

The worker commits only after a checkpoint; that checkpoint + commit is timed
on its own (``checkpoint_commit_s``) because it is paid per checkpoint
interval, not per event. Rounds rotate the order of the four runs so a
neighbour's load spike cannot favour one side; every figure is a median.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from stream.worker import heap
from stream.bench.bare_produce import bare_produce
from stream.bench.common import BenchWorld, Cluster, LearnerFactory, Progress, event_records, item_records, \
    median, produce, ratio, temp_state_dir

log = logging.getLogger(__name__)

TARGET = 0.8
PUBLISH_TARGET = 0.5  # worker with publishing / bare consume->produce


def bare_consume(settings, topic: str, n: int, client_kwargs: dict, timeout_s: float) -> float:
    """Events/s of a plain KafkaConsumer + json.loads over the first ``n`` records."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers.split(","),
                             group_id=f"bench-bare-{uuid.uuid4().hex[:8]}", enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=settings.max_poll_records,
                             fetch_max_wait_ms=settings.fetch_max_wait_ms, **client_kwargs)
    try:
        seen, first, started = 0, 0, None
        deadline = time.monotonic() + timeout_s
        loads = json.loads
        while seen < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare consumer read {seen} of {n} records in {timeout_s:.0f}s")
            polled = consumer.poll(timeout_ms=500)
            for records in polled.values():
                for record in records:
                    loads(record.value)
                seen += len(records)
            if started is None and seen:
                started, first = time.perf_counter(), seen
        elapsed = time.perf_counter() - started
        consumer.commit()
    finally:
        consumer.close(autocommit=False)
    return (n - first) / elapsed if elapsed > 0 else float("nan")


def worker_consume(settings, learner, n: int, publish: bool, timeout_s: float) -> dict:
    """Events/s of ``Worker.turn()`` with training never due, then its checkpoint + commit."""
    from stream.metrics import WorkerMetrics
    from stream.worker import Worker

    settings = settings.model_copy(update={
        "group_id": f"bench-worker-{uuid.uuid4().hex[:8]}", "state_dir": temp_state_dir("ingest"),
        "metrics_port": 0, "experience_size": 10 ** 9, "max_experience_wait_s": 1e9,
        "checkpoint_interval_s": 1e9, "progress_interval_s": 1e9})
    learner.shed_pending(0)  # the learner is shared by the runs: start each with nothing pending
    worker = Worker(settings, learner=learner, metrics=WorkerMetrics())
    if not publish:
        # The bench's only patch of the worker: user vectors are computed and sent by
        # this one method of its publisher; replacing it isolates the consume/validate/apply work.
        worker.publisher.publish_users = lambda user_ids: None
    worker.connect()
    try:
        first, started = 0, None
        deadline = time.monotonic() + timeout_s
        while worker.totals.consumed < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker consumed {worker.totals.consumed} of {n} records in {timeout_s:.0f}s")
            worker.turn()
            if started is None and worker.totals.consumed:
                started, first = time.perf_counter(), worker.totals.consumed
        elapsed = time.perf_counter() - started
        consumed = worker.totals.consumed
        t0 = time.perf_counter()
        worker.checkpoint()
        checkpoint_s = time.perf_counter() - t0
        return {"events_per_s": (consumed - first) / elapsed if elapsed > 0 else float("nan"),
                "checkpoint_commit_s": round(checkpoint_s, 3),
                "valid": worker.totals.valid, "duplicates": worker.totals.duplicates}
    finally:
        worker.close()


def run(cluster: Cluster, factory: LearnerFactory, world: BenchWorld, *, events: int, rounds: int,
        progress: Progress, phase: str = "ingest") -> dict:
    settings = cluster.topics(phase)
    kwargs = cluster.client_kwargs()
    items = world.items()
    produce(settings, settings.items_topic, item_records(items), kwargs)
    records = event_records(world, 0, events, id_prefix=f"{phase}-{cluster.run_id}")
    produce_s = produce(settings, settings.events_topic, records, kwargs)
    del records
    progress(f"{phase}: {events} events produced in {produce_s:.1f}s; {rounds} round(s) of bare / "
             f"bare+produce / worker / worker+publish")
    learner = factory.make(items)  # one learner for every worker run: catalogue loaded once
    dim = int(learner.item_vectors([items[0].item_id]).shape[1])
    timeout_s = max(120.0, events / 200.0)
    order = ["bare", "bare_produce", "worker", "worker_publish"]
    runs: dict[str, list] = {name: [] for name in order}
    checkpoint_s = []
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            if name.startswith("bare"):
                # As Worker.connect() does (and Worker.close() undoes), so both sides run on the same heap.
                heap.freeze_startup_objects()
                rate = bare_consume(settings, settings.events_topic, events, kwargs, timeout_s) \
                    if name == "bare" else bare_produce(settings, settings.events_topic, events, dim, kwargs,
                                                        timeout_s)
            else:
                result = worker_consume(settings, learner, events, name == "worker_publish", timeout_s)
                rate = result["events_per_s"]
                checkpoint_s.append(result["checkpoint_commit_s"])
            runs[name].append(round(rate, 1))
            progress(f"{phase}: round {r + 1} {name}: {rate:,.0f} events/s")
    bare, plain, publish = (median(runs[k]) for k in ("bare", "worker", "worker_publish"))
    # Each round's ratios are side by side; the figures are their medians (not ratios of medians).
    ratios = median([ratio(w, b) for w, b in zip(runs["worker"], runs["bare"])])
    ratios_publish = median([ratio(w, b) for w, b in zip(runs["worker_publish"], runs["bare"])])
    publish_ratio = median([ratio(w, b) for w, b in zip(runs["worker_publish"], runs["bare_produce"])])
    return {
        "events": events, "rounds": rounds, "users": world.n_users, "items": world.n_items,
        "max_poll_records": settings.max_poll_records,
        "bare_events_per_s": round(bare, 1),
        "worker_events_per_s": round(plain, 1),
        "worker_publish_events_per_s": round(publish, 1),
        "ratio": ratios,
        "ratio_with_publish": ratios_publish,
        "bare_produce_events_per_s": round(median(runs["bare_produce"]), 1),
        "publish_ratio": publish_ratio,
        "publish_target_ratio": PUBLISH_TARGET,
        "publish_met": bool(publish_ratio and publish_ratio >= PUBLISH_TARGET),
        "target_ratio": TARGET,
        "target_uses": "ratio (consume, validate, de-duplicate, apply to user state; publishing measured apart)",
        "met": bool(ratios and ratios >= TARGET),
        "checkpoint_commit_s": median(checkpoint_s),
        "runs": runs,
    }
