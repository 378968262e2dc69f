"""P1-cold, part by part: which coordinates of the published vectors rank the cold items.

    python benchmarks/cold_parts.py --data /tmp/ml --slice full --seed 0

Runs protocol P1 with a learner strategy (block 0 trained, then each block
tested and trained) and, at every block, ranks that block's P1-cold test (the
items with fewer than 5 events before it) by parts of the same vectors:

* ``all``: the published vectors (P1-cold itself);
* ``model``: without the item-item head's and the trending coordinates;
* ``learned``: the model's learned part alone (text projection and id rows);
* ``popularity``: the popularity coordinates, each user's own mix of the rungs;
* ``rung<k>``: one rung's count alone, the same for every user (rung 0 has the
  shortest half-life; the last counts all events ever);
* ``trending``: the trending coordinate alone (learners.statistics.trending), the same for
  every user.

Prints NDCG@10 per part, mean over blocks, then per block. The parts are
sliced out of the vectors by the learner's layout (``vector_dim``,
``item_item_dims``, the number of popularity rungs, the trending coordinate last).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from ranking_slices import Learners, build_slice  # noqa: E402
from learners.statistics import trending  # noqa: E402
from learners.evaluation.files import read_events, read_items  # noqa: E402
from learners.evaluation.protocol import prepare_p1, score_block  # noqa: E402


class Part:
    """A strategy's recommender scored by ``score(user vectors, item vectors, item ids)``."""

    def __init__(self, recommender, name: str, score) -> None:
        self.recommender, self.name, self._score = recommender, name, score

    def freeze_users(self, user_ids):
        return self.recommender.freeze_users(user_ids)

    def scores(self, users, item_ids):
        learner = self.recommender.learner
        rows = learner.catalogue.rows(users.item_ids.ravel()).reshape(users.item_ids.shape)
        return self._score(learner.user_vectors_from(rows, users.weights), learner.item_vectors(item_ids), item_ids)


def parts(recommender) -> dict:
    config, model = recommender.learner.config, recommender.learner.model
    head = min(config.item_item_dims, config.vector_dim // 2)
    end = config.vector_dim - head - trending.DIMS  # the model's coordinates; the head's and trending's follow
    rungs = model.pop_dims
    learned = end - rungs
    out = {
        "all": lambda u, i, _: u @ i.T,
        "model": lambda u, i, _: u[:, :end] @ i[:, :end].T,
        "learned": lambda u, i, _: u[:, :learned] @ i[:, :learned].T,
        "popularity": lambda u, i, _: u[:, learned:end] @ i[:, learned:end].T,
        "trending": lambda u, i, _: np.broadcast_to(i[:, -1], (len(u), len(i))).copy(),
    }
    for k in range(rungs):
        out[f"rung{k}"] = (lambda k: lambda u, i, _: np.broadcast_to(i[:, learned + k], (len(u), len(i))).copy())(k)
    return {name: Part(recommender, name, score) for name, score in out.items()}


def one_run_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark that runs P1 once: one slice, one learner strategy, one seed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with events.jsonl and items.jsonl")
    parser.add_argument("--slice", default="full", help="full, top1700, users0 or users1 (benchmarks/ranking_slices.py)")
    parser.add_argument("--strategy", default="ewc_replay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="learner setting")
    return parser


def main() -> None:
    args = one_run_parser(__doc__).parse_args()
    import torch

    torch.set_num_threads(1)
    events = read_events(Path(args.data) / "events.jsonl").records
    items = read_items(Path(args.data) / "items.jsonl").records
    prepared = prepare_p1(*build_slice(args.slice, events, items), 10, 10)
    recommender = Learners(dict(kv.split("=", 1) for kv in args.set)).build(args.strategy, args.seed)
    recommender.add_items(list(prepared.items))
    recommender.learn(prepared.blocks[0])
    cold = {test.block: test for test in prepared.cold_tests}
    per_part: dict[str, list[float]] = {}
    for test in prepared.tests:
        if test.block in cold and cold[test.block].user_ids:
            for name, part in parts(recommender).items():
                score = score_block(part, cold[test.block], prepared.catalogue, prepared.k)
                per_part.setdefault(name, []).append(score.ndcg)
        recommender.learn(prepared.blocks[test.block])
    print(f"{args.slice}, {args.strategy}, seed {args.seed} {' '.join(args.set)}: P1-cold NDCG@10 by part")
    for name, values in per_part.items():
        print(f"  {name:10s} {np.mean(values):.4f}   " + " ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
