"""A click-fraud burst against the learner, and a genuine trend beside it.

    python benchmarks/fraud_burst.py --events /tmp/ml/events.jsonl --items /tmp/ml/items.jsonl --seeds 0,1,2

1. The learner trains on the first ``--warmup`` real events.
2. ``--fake-users`` brand-new users send ``--fake-events`` favourites each on ``--targets``
   items that had fewer than 3 events so far, interleaved with the next ``--during`` real events.
3. Then ``--after`` more real events.

Printed per seed, as JSON: ``reach``, the share of real users active in step 3 with a
hammered item in their top 10 (learners.evaluation.fraud). ``--trend`` plays a genuine trend
instead: as many established users (the most active so far) each favourite one target once;
``reach_others`` is then the share among the active users who took no part in it.
``--config`` sets learner fields (``'{"established_user_items": 0}'``: the defence off);
``--guard`` judges every update as the worker does and counts the undone ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from learners.evaluation import fraud  # noqa: E402
from learners.evaluation.files import read_events, read_items  # noqa: E402
from learners.learner import ContinualRecommender, LearnerConfig  # noqa: E402
from stream.config import default_model_path  # noqa: E402

EXPERIENCE = 512  # events per learn() call, as `recstream evaluate` trains


def feed(learner: ContinualRecommender, events: list) -> None:
    for start in range(0, len(events), EXPERIENCE):
        learner.observe_many(events[start:start + EXPERIENCE])
        learner.learn()


def run(args, seed: int) -> dict:
    events = list(read_events(args.events).records)
    items = list(read_items(args.items).records)
    rng = random.Random(seed)
    warm, during = events[:args.warmup], events[args.warmup:args.warmup + args.during]
    after = events[args.warmup + args.during:args.warmup + args.during + args.after]
    counts = Counter(e.item_id for e in warm)
    targets = rng.sample(sorted(i.item_id for i in items if counts[i.item_id] < 3), args.targets)
    trend_users = [u for u, _ in Counter(e.user_id for e in warm).most_common(args.fake_users)] if args.trend else None
    # Refits of the item-item head by the event count alone (not wall time), so runs repeat exactly.
    config = dataclasses.replace(LearnerConfig(model_path=args.model or default_model_path(), seed=seed, device="cpu",
                                               item_item_time_share=0.0),
                                 **json.loads(args.config))
    learner = ContinualRecommender(config)
    if args.guard is not None:
        learner.guard_updates(args.guard)
    learner.add_items(items)
    started = time.perf_counter()
    feed(learner, warm)
    feed(learner, fraud.trend(during, targets, trend_users, rng) if trend_users
         else fraud.burst(during, targets, args.fake_users, args.fake_events, rng))
    feed(learner, after)
    active = sorted({e.user_id for e in after})
    result = {"seed": seed, "reach": round(fraud.reach(learner, active, targets), 4), "users": len(active),
              "train_seconds": round(time.perf_counter() - started, 1)}
    if args.guard is not None:
        result.update(updates=learner.model_version, undone=learner.rollbacks)
    if trend_users:
        others = [u for u in active if u not in set(trend_users)]
        result.update(reach_others=round(fraud.reach(learner, others, targets), 4), others=len(others))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", required=True)
    parser.add_argument("--items", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--warmup", type=int, default=10_000)
    parser.add_argument("--during", type=int, default=1_500)
    parser.add_argument("--after", type=int, default=1_500)
    parser.add_argument("--fake-users", type=int, default=300)
    parser.add_argument("--fake-events", type=int, default=10)
    parser.add_argument("--targets", type=int, default=3)
    parser.add_argument("--trend", action="store_true", help="established users instead of fake ones")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--guard", type=float, default=None, metavar="TOLERANCE",
                        help="judge every update as the worker's --guard-tolerance does; prints how many were undone")
    parser.add_argument("--config", default="{}", help="LearnerConfig fields as JSON")
    args = parser.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        print(json.dumps(run(args, seed)), flush=True)


if __name__ == "__main__":
    main()
