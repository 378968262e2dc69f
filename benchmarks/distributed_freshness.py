"""Event -> user vector time with K ranks of one model (``--distributed`` under torchrun).

    python benchmarks/distributed_freshness.py --ranks 2 --rate 200 --seconds 120

Starts the embedded broker, puts the item texts on it, starts
``torchrun --nproc-per-node K -m stream.cli worker --distributed true`` with
training on, waits until every rank holds its partitions, then sends
``--rate`` events/s for ``--seconds`` seconds and follows the vectors topic,
as ``recstream bench``'s freshness section does for one worker: an event is
served by the first vector of its user created after it was sent, latency =
when the reader saw that vector minus the send time. Prints one JSON object:
p50 / p99 of that latency, events unserved, and what each rank trained.
On a machine with fewer cores than ranks the ranks compete for them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from stream.bench.common import BenchWorld, item_records, produce  # noqa: E402
from stream.bench.freshness import EventProducer, Matcher, VectorReader  # noqa: E402
from stream.config import Settings  # noqa: E402
from stream.kafka.broker import EmbeddedBroker  # noqa: E402
from worker_harness import WorkerProcess, make_topics, summed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rate", type=float, default=200.0, help="events/s")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--text-items", type=int, default=300)
    args = parser.parse_args()
    world = BenchWorld(n_users=args.users, n_items=args.items, text_items=args.text_items)
    work = Path(tempfile.mkdtemp(prefix="recstream-dist-fresh-"))
    with EmbeddedBroker() as broker:
        topics = make_topics(broker.bootstrap, lambda prefix: f"{prefix}-{uuid.uuid4().hex[:6]}",
                             partitions=args.partitions)
        settings = Settings(bootstrap_servers=broker.bootstrap, events_topic=topics.events,
                            items_topic=topics.items, vectors_topic=topics.vectors)
        produce(settings, topics.items, item_records(world.items()), {})
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
                    "-m", "stream.cli", "worker", "--distributed", "true"]
        worker = WorkerProcess(broker.bootstrap, topics, work / "state", work / "group.log", command=torchrun,
                               torch_threads=1, progress_interval_s=10)
        try:
            worker.wait_for_ranks(args.ranks, lambda ranks: summed(ranks, "recstream_partitions_assigned")
                                  == args.partitions, 600, "every partition assigned")
            matcher = Matcher()
            reader = VectorReader(settings, matcher, {})
            reader.start()
            producer = EventProducer(settings, world, args.rate, matcher, {}, id_prefix=f"df-{uuid.uuid4().hex[:6]}",
                                     linger_ms=settings.producer_linger_ms)
            matcher.started_ms = int(time.time() * 1000)
            producer.start()
            time.sleep(args.seconds)
            producer.stop()
            producer.join(timeout=30)
            grace = time.monotonic() + 60
            while matcher.unserved() and time.monotonic() < grace:
                time.sleep(0.2)
            ranks = worker.rank_metrics(args.ranks)
            worker.terminate(timeout_s=180)
        except BaseException:
            worker.kill()
            raise
        reader.stop()
        reader.join(timeout=10)
    visible = matcher.visible.summary()
    print(json.dumps({
        "ranks": args.ranks, "partitions": args.partitions, "rate_events_per_s": args.rate,
        "seconds": args.seconds, "events_sent": matcher.sent, "events_unserved": matcher.unserved(),
        "producer_behind_max_s": round(producer.behind_s, 3),
        "match_exact_below_s": round(world.n_users / args.rate, 3),
        "event_to_vector_visible": visible,
        "per_rank": [{name: m.get(f"recstream_{name}") for name in (
            "events_consumed_total", "train_samples_total", "model_version", "partitions_assigned")}
            for m in ranks],
        "log": str(work / "group.log"),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
