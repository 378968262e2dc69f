"""Protocol P1 on differently shaped slices of one data set, several seeds, against two peers.

    recstream convert movielens ../shared/data/movielens-latest-small --out /tmp/ml
    python benchmarks/ranking_slices.py --data /tmp/ml --out /tmp/slices.json
    python benchmarks/ranking_slices.py --data /tmp/ml --slices top1700 --seeds 0 \\
        --set popularity_weight=0.3 --strategies ewc_replay

Defaults are chosen on data they will not be judged on, so a setting has to win
on every slice, not on one: ``full`` (the data as is), ``top1700`` (only the
1,700 most-rated items: a catalogue the size of MovieLens-100K's), ``users0`` /
``users1`` (a random half of the users, two draws), ``early`` / ``late`` (the
first and the second half of the events in time: other years, other films,
other raters). Slices are built in memory
from the converted files; nothing derived from the data is written into the
repository.

Peers, as BASELINES.md defines them (the held-out table compares with exactly
these): ``decayed_pop`` (event counts halving every 5,000 events) and
``ease_rw`` (EASE, L2 = 200, refit before every block on the user-item matrix
with each entry weighted 0.5^(age / 20,000 events), age from the user's last
event with the item). Peers are deterministic and computed once per slice
(cached in ``--out``); learner strategies run once per seed with the worker's
defaults (``stream.config.Settings``) plus ``--set`` overrides.

Prints, per slice and strategy, NDCG@10 mean and spread (min..max) over seeds,
P1-cold NDCG@10, BWT and samples trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from learners.evaluation.files import read_events, read_items  # noqa: E402
from learners.evaluation.protocol import prepare_p1, run_prepared  # noqa: E402
from learners.evaluation.peers import PEERS as PEER_RECOMMENDERS  # noqa: E402
from learners.records import Event, Item  # noqa: E402

SLICES = ("full", "top1700", "users0", "users1")  # the default set; "early" and "late" on request
PEERS = ("decayed_pop", "ease_rw")  # shown by default; "ease" too on request


# -- slices ---------------------------------------------------------------------------------------

def build_slice(name: str, events: list[Event], items: list[Item]) -> tuple[list[Event], list[Item]]:
    if name == "full":
        return events, items
    if name in ("early", "late"):
        ordered = sorted(events, key=lambda e: e.ts)
        half = ordered[: len(ordered) // 2] if name == "early" else ordered[len(ordered) // 2:]
        keep = {e.item_id for e in half}
        return half, [i for i in items if i.item_id in keep]
    if name.startswith("top"):
        keep = {i for i, _ in Counter(e.item_id for e in events).most_common(int(name[3:]))}
    elif name.startswith("users"):
        users = sorted({e.user_id for e in events})
        random.Random(int(name[5:])).shuffle(users)
        chosen = set(users[: len(users) // 2])
        kept = [e for e in events if e.user_id in chosen]
        keep = {e.item_id for e in kept}
        return kept, [i for i in items if i.item_id in keep]
    else:
        raise SystemExit(f"unknown slice {name!r}; choose from {', '.join(SLICES)}, early, late")
    return [e for e in events if e.item_id in keep], [i for i in items if i.item_id in keep]


# -- peers ----------------------------------------------------------------------------------------

# The peers are recstream evaluate's own: learners.evaluation.peers.


# -- learner strategies ---------------------------------------------------------------------------

class Learners:
    """Learner strategies sharing one encoder and one cache of its frozen features."""

    def __init__(self, overrides: dict) -> None:
        from learners.encoder import TextEncoder, resolve_device
        from stream.config import Settings
        from stream.learner_setup import learner_config

        settings = Settings()
        self.experience_size = int(overrides.pop("experience_size", settings.experience_size))
        base = learner_config(settings)
        types = {f.name: f.type for f in dataclasses.fields(base)}
        typed = {k: _parse(v, getattr(base, k)) for k, v in overrides.items() if k in types}
        unknown = set(overrides) - set(typed)
        if unknown:
            raise SystemExit(f"--set: not learner settings: {', '.join(sorted(unknown))}")
        self.config = dataclasses.replace(base, device="cpu", **typed)
        self.encoder = TextEncoder.from_config(self.config, resolve_device("cpu"))
        self.cache: dict = {}

    def build(self, name: str, seed: int):
        from learners.evaluation.strategies import JointRecommender, LearnerRecommender

        config = dataclasses.replace(self.config, seed=seed)
        if name == "joint":
            joint = dataclasses.replace(config, batch_size=512)
            return JointRecommender(lambda: LearnerRecommender("naive", joint, self.encoder, self.cache,
                                                               self.experience_size), 2)
        return LearnerRecommender(name, config, self.encoder, self.cache, self.experience_size)


def _parse(text: str, like):
    if isinstance(like, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if isinstance(like, tuple) or (like is None and "," in text):
        return tuple(float(t) for t in text.split(",") if t)
    return text


# -- driver ---------------------------------------------------------------------------------------

def _summary(result) -> dict:
    return {"ndcg": result.ndcg, "recall": result.recall, "cold_ndcg": result.cold_ndcg, "bwt": result.bwt,
            "samples": result.samples_trained, "train_s": result.train_seconds,
            "users": sum(b.users for b in result.per_block)}


def _line(slice_name: str, name: str, runs: list[dict]) -> str:
    def stat(key, fmt):
        values = [r[key] for r in runs if r[key] is not None]
        if not values:
            return "n/a"
        mean = fmt.format(float(np.mean(values)))
        return mean if len(values) == 1 else f"{mean} ({fmt.format(min(values))}..{fmt.format(max(values))})"

    return (f"| {slice_name} | {name} | {stat('ndcg', '{:.4f}')} | {stat('cold_ndcg', '{:.4f}')} "
            f"| {stat('bwt', '{:+.4f}')} | {int(np.mean([r['samples'] for r in runs]))} | {len(runs)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with events.jsonl and items.jsonl")
    parser.add_argument("--out", default="/tmp/ranking_slices.json", help="results (peers are cached here)")
    parser.add_argument("--slices", default=",".join(SLICES))
    parser.add_argument("--strategies", default="ewc_replay", help="learner strategies and/or peers")
    parser.add_argument("--peers", default=",".join(PEERS), help="peers to show (computed once, cached)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scenario", default="time", help="time (P1 as is) or genre-epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="learner setting")
    parser.add_argument("--tag", default="", help="label of this configuration in the results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)

    events = read_events(Path(args.data) / "events.jsonl").records
    items = read_items(Path(args.data) / "items.jsonl").records
    if args.scenario != "time":
        from learners.evaluation.scenarios import apply_scenario

        events = apply_scenario(args.scenario, events, items)
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {}
    overrides = dict(kv.split("=", 1) for kv in args.set)
    tag = args.tag or ",".join(args.set) or "defaults"
    learners = None
    lines = []
    for slice_name in args.slices.split(","):
        slice_events, slice_items = build_slice(slice_name, events, items)
        prepared = prepare_p1(slice_events, slice_items, 10, 10)
        key = f"{args.scenario}/{slice_name}"
        store = saved.setdefault(key, {})
        for peer in [p for p in args.peers.split(",") if p]:
            if peer not in store.get("peers", {}):
                recommender = PEER_RECOMMENDERS[peer]()
                store.setdefault("peers", {})[peer] = [_summary(run_prepared(recommender, prepared))]
            lines.append(_line(slice_name, peer, store["peers"][peer]))
        for name in [s for s in args.strategies.split(",") if s]:
            runs = []
            for seed in (int(s) for s in args.seeds.split(",")):
                learners = learners or Learners(dict(overrides))
                started = time.perf_counter()
                runs.append(_summary(run_prepared(learners.build(name, seed), prepared)))
                print(f"  {slice_name} {name} seed {seed}: ndcg {runs[-1]['ndcg']:.4f} cold "
                      f"{runs[-1]['cold_ndcg']:.4f} bwt {runs[-1]['bwt']:+.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            store.setdefault(tag, {})[name] = runs
            lines.append(_line(slice_name, f"{name} [{tag}]", runs))
        out.write_text(json.dumps(saved, indent=1))
    print(f"\n{len(prepared.tests)} test blocks a slice; NDCG@10 mean (min..max over seeds)\n")
    print("| slice | strategy | NDCG@10 | P1-cold NDCG@10 | BWT | samples | runs |\n|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
