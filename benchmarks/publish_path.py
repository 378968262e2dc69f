"""The worker's publishing path alone, per user vector: compute, explain, encode, send, acknowledge.

    python benchmarks/publish_path.py --rounds 6

The worker's own ``Publisher.publish_users`` for each batch of touched users
(vectors, ``because``, encoding, ``VectorSink``), then one flush, timed per
user against the embedded broker, on the bench's world (``recstream bench``:
10,000 users, 10,000 items, 2,000 with a text).
``recstream bench --sections ingest`` measures publishing inside the whole
loop, where the broker's fetch timing moves a short round by 2x; this path
alone repeats within a few per cent, so a change to it can be seen.
The objects alive after setup are frozen out of the garbage collector's way,
as ``Worker.connect()`` does (stream/worker/heap.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream.bench.common import BenchWorld, LearnerFactory, remove_state_dirs, temp_state_dir  # noqa: E402
from stream.config import Settings  # noqa: E402
from stream.kafka.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from stream.kafka.sinks import make_producer  # noqa: E402
from stream.metrics import WorkerMetrics  # noqa: E402
from stream.worker import heap  # noqa: E402
from stream.worker.dead_letter_book import DeadLetterBook  # noqa: E402
from stream.worker.lifecycle import Lifecycle  # noqa: E402
from stream.worker.publisher import Publisher  # noqa: E402
from stream.worker.totals import Totals  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--users", type=int, default=12_000, help="events whose users are published, per round")
    parser.add_argument("--batch", type=int, default=3_000, help="users per publish (the worker's publish window)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    world = BenchWorld(10_000, 10_000, 2_000)
    learner = LearnerFactory(Settings(bootstrap_servers="unused:9092")).make(world.items())
    events = list(world.events(0, 2 * args.users))
    learner.observe_many(events)
    users = list(dict.fromkeys(e.user_id for e in events[-args.users:]))
    batches = [users[i:i + args.batch] for i in range(0, len(users), args.batch)]
    heap.freeze_startup_objects()
    with EmbeddedBroker() as broker:
        try:
            per_user = rounds(broker, learner, batches, args.rounds, len(users))
        finally:
            remove_state_dirs()
    print(f"{len(users):,} user vectors a round: {statistics.median(per_user):.1f} us each, median of "
          f"{args.rounds} rounds (" + " / ".join(f"{x:.1f}" for x in per_user) + ")")


def rounds(broker, learner, batches, n_rounds: int, n_users: int) -> list[float]:
    """us per user vector of each round: ``publish_users`` over ``batches``, then one flush."""
    settings = Settings(bootstrap_servers=broker.bootstrap, state_dir=temp_state_dir("publish-path"))
    ensure_topics(broker.bootstrap, {settings.vectors_topic: 4})
    metrics = WorkerMetrics()
    publisher = Publisher(settings, learner, metrics, Totals(), DeadLetterBook(), Lifecycle(metrics))
    publisher.attach(make_producer(settings))
    per_user = []
    for _ in range(n_rounds):
        started = time.perf_counter()
        for batch in batches:
            publisher.publish_users(batch)
        publisher.vectors.flush()
        per_user.append((time.perf_counter() - started) / n_users * 1e6)
    return per_user


if __name__ == "__main__":
    main()
