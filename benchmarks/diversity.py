"""What diversity costs in ranking quality: protocol P1 with MMR on top of the product's scores.

    recstream convert movielens ../shared/data/movielens-latest-small --out /tmp/ml
    python benchmarks/diversity.py --data /tmp/ml --slice top1700 --users 200 --diversity 0,0.3,0.6

One run of the product strategy (``ewc_replay``, the worker's defaults) through
P1 (docs/formats.md): at every test block, each test user's 50 best items by
score (history excluded) are re-ranked by maximal marginal relevance over the
learner's item-item cosine (``stream.ranking.mmr``, what ``recstream topk
--diversity L`` does) for each L, and NDCG@10 and intra-list similarity (mean
pairwise cosine of the 10 picks) are averaged over the block's users, then
over blocks. L = 0 is P1's own ranking. ``--users N`` keeps a random N users
of the slice (seeded) to make the run shorter. Nothing derived from the data
is written into the repository.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from learners.evaluation.files import read_events, read_items  # noqa: E402
from learners.evaluation.protocol import freeze_block, prepare_p1, top_k, user_metrics  # noqa: E402
from ranking_slices import Learners, build_slice  # noqa: E402
from stream import ranking  # noqa: E402

K = 10


def _users(events, n: int, seed: int):
    if not n:
        return events
    users = sorted({e.user_id for e in events})
    random.Random(seed).shuffle(users)
    chosen = set(users[:n])
    return [e for e in events if e.user_id in chosen]


def run(recommender, prepared, levels: list[float]) -> dict[float, tuple[float, float]]:
    """(NDCG@10, intra-list similarity) per diversity level, P1's averaging (users, then blocks)."""
    catalogue = prepared.catalogue
    pool = ranking.pool_size(K, max(levels))
    per_block: dict[float, list[tuple[float, float]]] = {level: [] for level in levels}
    recommender.add_items(list(prepared.items))
    recommender.learn(prepared.blocks[0])
    for test in prepared.tests:
        if test.user_ids:
            frozen = freeze_block(recommender, test, catalogue)
            scores = np.concatenate([recommender.scores(part, catalogue) for part in frozen]).astype(np.float64)
            for i, seen in enumerate(test.history):
                scores[i, seen] = -np.inf
            vectors = recommender.learner.item_vectors(catalogue)
            candidates = top_k(scores, pool)
            for level in levels:
                ndcgs, ils = [], []
                for user, cand in enumerate(candidates):
                    picks = cand[ranking.mmr(scores[user, cand], vectors[cand], K, level)]
                    ndcgs.append(user_metrics(picks, test.truth[user], K)[1])
                    ils.append(ranking.intra_list_similarity(vectors[picks]))
                per_block[level].append((float(np.mean(ndcgs)), float(np.mean(ils))))
        recommender.learn(prepared.blocks[test.block])
    return {level: tuple(np.mean(values, axis=0).tolist()) for level, values in per_block.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with events.jsonl and items.jsonl")
    parser.add_argument("--slice", default="top1700", help="a slice of benchmarks/ranking_slices.py")
    parser.add_argument("--users", type=int, default=0, help="keep this many random users of the slice (0 = all)")
    parser.add_argument("--diversity", default="0,0.3,0.6", help="comma-separated L values in [0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    events = read_events(Path(args.data) / "events.jsonl").records
    items = read_items(Path(args.data) / "items.jsonl").records
    events, items = build_slice(args.slice, events, items)
    events = _users(events, args.users, args.seed)
    prepared = prepare_p1(events, items, 10, K)
    levels = [float(x) for x in args.diversity.split(",")]
    started = time.perf_counter()
    results = run(Learners({}).build("ewc_replay", args.seed), prepared, levels)
    print(f"{args.slice}, {args.users or 'all'} users, {len(events)} events, seed {args.seed}, "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| diversity L | NDCG@10 | intra-list similarity |\n|---:|---:|---:|")
    for level, (ndcg, ils) in results.items():
        print(f"| {level:g} | {ndcg:.4f} | {ils:.4f} |")


if __name__ == "__main__":
    main()
