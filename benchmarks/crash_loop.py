"""Progress under a crash loop: a worker SIGKILLed a fixed time after every start.

    recstream convert movielens ../shared/data/movielens-latest-small --out /tmp/ml
    python benchmarks/crash_loop.py --data /tmp/ml --cycles 5 --kill-after-s 30

All item texts and the first ``--backlog`` events are on the embedded broker before the first
start; the rest of the events arrive at ``--live-rate`` per second while the worker is killed
and restarted (all of them up front with ``--backlog 0``). After each kill it prints what the group has committed (events) and what the newest checkpoint holds
(item texts, model version). A last start runs to the end and is stopped with SIGTERM, to
check nothing was lost: consumed = valid + dead-lettered + duplicates, and the committed
offsets reach the log end.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path

from kafka import KafkaAdminClient, KafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from learners.records import Event, Item, event_to_json  # noqa: E402
from stream.kafka.broker import EmbeddedBroker, log_end_offsets  # noqa: E402
from worker_harness import WorkerProcess, make_topics, produce_events, produce_items  # noqa: E402


def committed_events(bootstrap: str, group: str, topic: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return sum(meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset > 0)


def newest_checkpoint(state_dir: Path) -> dict:
    folders = sorted(state_dir.glob("ckpt-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not folders:
        return {"items": 0, "model_version": 0, "checkpoints": 0}
    newest = folders[-1]
    catalogue = json.loads((newest / "catalogue.json").read_text())
    state = json.loads((newest / "state.json").read_text())
    return {"items": sum(1 for text in catalogue.get("texts", []) if text is not None),
            "model_version": state["model_version"], "checkpoints": int(newest.name.rsplit("-", 1)[1]),
            "folder": newest}


def feed(bootstrap: str, topic: str, events: list[Event], rate: float) -> None:
    """Produce ``events`` at about ``rate`` per second, in one-second slices, through one producer."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    step = max(1, int(rate))
    for start in range(0, len(events), step):
        began = time.monotonic()
        for event in events[start:start + step]:
            producer.send(topic, key=event.user_id.encode(), value=event_to_json(event))
        producer.flush()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
    producer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="folder with events.jsonl and items.jsonl")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--kill-after-s", type=float, default=30.0)
    parser.add_argument("--events", type=int, default=0, help="first N events (0: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="worker setting (RECSTREAM_<KEY>), repeatable")
    parser.add_argument("--backlog", type=int, default=0, help="events on the broker before the first start "
                        "(0: all of them)")
    parser.add_argument("--live-rate", type=float, default=300.0, help="events per second after the backlog")
    parser.add_argument("--no-final-run", action="store_true")
    args = parser.parse_args()
    items = [Item(**json.loads(line)) for line in open(args.data / "items.jsonl")]
    events = [Event(**json.loads(line)) for line in open(args.data / "events.jsonl")]
    events = events[:args.events] if args.events else events
    settings = {"session_timeout_ms": 10_000, "max_poll_interval_ms": 300_000}  # the worker's defaults
    settings.update(dict(pair.split("=", 1) for pair in args.set))
    work = Path(f"/tmp/recstream-crash-loop-{uuid.uuid4().hex[:6]}")
    state = work / "state"
    work.mkdir(parents=True)
    with EmbeddedBroker() as broker:
        topics = make_topics(broker.bootstrap, lambda prefix: f"{prefix}-{uuid.uuid4().hex[:6]}")
        produce_items(broker.bootstrap, topics.items, items)
        backlog = args.backlog or len(events)
        produce_events(broker.bootstrap, topics.events, events[:backlog])
        feeder = threading.Thread(target=feed, args=(broker.bootstrap, topics.events, events[backlog:],
                                                      args.live_rate), daemon=True)
        feeder.start()
        print(f"{len(events)} events ({backlog} up front, the rest at {args.live_rate:.0f}/s), "
              f"{len(items)} item texts; worker killed {args.kill_after_s:.0f} s "
              f"after each start; settings {settings}", flush=True)
        print("cycle | committed events | items in checkpoint | model version | checkpoints so far", flush=True)
        for cycle in range(args.cycles):
            worker = WorkerProcess(broker.bootstrap, topics, state, work / f"cycle-{cycle}.log", **settings)
            time.sleep(args.kill_after_s)
            worker.kill()
            ckpt = newest_checkpoint(state)
            print(f"{cycle} | {committed_events(broker.bootstrap, topics.group, topics.events)} | "
                  f"{ckpt['items']} | {ckpt['model_version']} | {ckpt['checkpoints']}", flush=True)
        if args.no_final_run:
            return
        feeder.join()
        texts_before = newest_checkpoint(state)["items"]
        worker = WorkerProcess(broker.bootstrap, topics, state, work / "final.log", **settings)
        started = time.monotonic()
        ends = sum(log_end_offsets(broker.bootstrap, topics.events).values())
        worker.wait_for(lambda m: m.get("recstream_partitions_assigned", 0) > 0
                        and m.get("recstream_consumer_lag_records", 1) == 0
                        and m.get("recstream_pending_events", 1) == 0
                        and m.get("recstream_items_received_total", 0) + texts_before >= len(items), 3600,
                        "every event and item text")
        print(f"final run: caught up after {time.monotonic() - started:.0f} s", flush=True)
        worker.terminate()
        totals = json.loads((newest_checkpoint(state)["folder"] / "extra.json").read_text())["totals"]
        print(f"committed {committed_events(broker.bootstrap, topics.group, topics.events)} of {ends}; "
              f"totals {totals}; consumed == valid + dead-lettered + duplicates: "
              f"{totals['consumed'] == totals['valid'] + totals['dead_lettered'] + totals['duplicates']}",
              flush=True)

if __name__ == "__main__":
    main()
