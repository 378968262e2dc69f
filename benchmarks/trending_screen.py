"""Screen the trending coordinate's settings on one trained model: P1 and P1-cold.

    python benchmarks/trending_screen.py --data /tmp/ml --slice full --seed 0 \\
        --grid 0:0,10:0.2,10:0.2:0:0,10:0.2:0.1:0,10:0.2:0.1:0.1

Runs protocol P1 once with a learner strategy whose trending coordinate is off
(``trending_weight=0``) and, at every block, ranks P1's and P1-cold's tests by
the published vectors' scores plus ``weight * value`` of each item, for every
``evidence:weight[:conversion:newness]`` of ``--grid``: value = the item's
rising value with that evidence (``PopularityLadder.rising``) + conversion x
its conversion + newness x its newness (``learners.statistics.item_evidence``); without
the last two, the product's (``learners.statistics.trending.CONVERSION`` and
``NEWNESS``). Every variant scores the same trained model, so the differences
between them are the coordinate's alone, with no training noise in between.
``0:0`` is the vectors without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cold_parts import Part, one_run_parser  # noqa: E402
from ranking_slices import Learners, build_slice  # noqa: E402
from learners.statistics import trending  # noqa: E402
from learners.evaluation.files import read_events, read_items  # noqa: E402
from learners.evaluation.protocol import prepare_p1, score_block  # noqa: E402


def variants(recommender, grid: list[tuple[float, float]]) -> dict:
    model = recommender.learner.model
    out = {}
    conversion, newness = model.conversion().numpy(), model.newness().numpy()
    for evidence, weight, *parts in grid:
        a, b = parts if parts else (trending.CONVERSION, trending.NEWNESS)
        value = model.rising(evidence).double().numpy() + a * conversion + b * newness if weight \
            else np.zeros(model.n_items)
        rows_of = recommender.learner.catalogue.rows

        def score(u, i, ids, value=value, weight=weight):
            return u @ i.T + weight * value[rows_of(ids)][None, :]
        name = f"evidence {evidence:g}, weight {weight:g}, conversion {a:g}, newness {b:g}" if weight \
            else "without the coordinate"
        out[name] = score
    return out


def main() -> None:
    parser = one_run_parser(__doc__)
    parser.add_argument("--grid", default="0:0,10:0.2:0:0,10:0.2", help="evidence:weight[:conversion:newness] entries")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    grid = [tuple(float(x) for x in pair.split(":")) for pair in args.grid.split(",")]
    events = read_events(Path(args.data) / "events.jsonl").records
    items = read_items(Path(args.data) / "items.jsonl").records
    prepared = prepare_p1(*build_slice(args.slice, events, items), 10, 10)
    settings = dict(kv.split("=", 1) for kv in args.set) | {"trending_weight": "0"}
    recommender = Learners(settings).build(args.strategy, args.seed)
    recommender.add_items(list(prepared.items))
    recommender.learn(prepared.blocks[0])
    cold = {test.block: test for test in prepared.cold_tests}
    p1: dict[str, list[float]] = {}
    p1_cold: dict[str, list[float]] = {}
    for test in prepared.tests:
        for name, score in variants(recommender, grid).items():
            part = Part(recommender, name, score)
            p1.setdefault(name, []).append(score_block(part, test, prepared.catalogue, prepared.k).ndcg)
            if test.block in cold and cold[test.block].user_ids:
                p1_cold.setdefault(name, []).append(score_block(part, cold[test.block], prepared.catalogue,
                                                                prepared.k).ndcg)
        recommender.learn(prepared.blocks[test.block])
    print(f"{args.slice}, {args.strategy}, seed {args.seed} {' '.join(args.set)}: NDCG@10")
    for name in p1:
        print(f"  {name:52s} P1 {np.mean(p1[name]):.4f}   P1-cold {np.mean(p1_cold.get(name, [0.0])):.4f}")


if __name__ == "__main__":
    main()
