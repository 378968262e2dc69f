"""Does one (item, model_version) always name one vector? A worker on MovieLens with item texts
arriving while events are applied; counts the (item, version) pairs published with two vectors.

    recstream convert movielens ../shared/data/movielens-latest-small --out /tmp/ml
    python benchmarks/item_versions.py --data /tmp/ml
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from learners.records import Event, Item  # noqa: E402
from stream.kafka.broker import EmbeddedBroker, read_topic  # noqa: E402
from worker_harness import WorkerProcess, make_topics, produce_events, produce_items  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="folder with events.jsonl and items.jsonl")
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--events", type=int, default=4000)
    args = parser.parse_args()
    items = [Item(**json.loads(line)) for line in open(args.data / "items.jsonl")][:args.items]
    ids = {i.item_id for i in items}
    events = [e for e in (Event(**json.loads(line)) for line in open(args.data / "events.jsonl"))
              if e.item_id in ids][:args.events]
    work = Path(f"/tmp/recstream-item-versions-{uuid.uuid4().hex[:6]}")
    with EmbeddedBroker() as broker:
        topics = make_topics(broker.bootstrap, lambda prefix: f"{prefix}-{uuid.uuid4().hex[:6]}")
        half = len(events) // 2
        produce_events(broker.bootstrap, topics.events, events[:half])
        worker = WorkerProcess(broker.bootstrap, topics, work / "state", work.with_suffix(".log"),
                               checkpoint_interval_s=5, experience_size=256)
        worker.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= half // 4, 600, "first events")
        for start in range(0, len(items), 200):  # texts arrive while events are applied and trained on
            produce_items(broker.bootstrap, topics.items, items[start:start + 200])
            if start == 800:
                produce_events(broker.bootstrap, topics.events, events[half:])
            time.sleep(0.3)
        worker.wait_for(lambda m: m.get("recstream_events_consumed_total", 0) >= len(events)
                        and m.get("recstream_pending_events", 1) == 0, 600, "all events trained")
        time.sleep(3)
        worker.terminate()
        seen: dict = {}
        clashes = 0
        for record in read_topic(broker.bootstrap, topics.vectors):
            value = json.loads(record.value)
            if value["payload"]["entity_type"] != "item":
                continue
            key = (value["payload"]["entity_id"], value["payload"]["model_version"])
            vector = np.array(value["vector"])
            if key in seen and float(seen[key] @ vector) < 0.9999:
                clashes += 1
            seen[key] = vector
    print(f"(item, version) pairs published with two different vectors: {clashes} of {len(seen)}")


if __name__ == "__main__":
    main()
