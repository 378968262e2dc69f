"""Distributed training: events/s of one process against two gloo ranks on the same events.

The same experiences both ways: one process learns every event; two ranks
(``--distributed``'s training rounds, spawned here with a file rendezvous) each
learn the events of the users that hash to them, a collective round per
experience. The figure is the stream's events trained per second of wall time
(replayed and padding samples not counted), the first experience (encoding the
catalogue, the first rows) left out. Both sides run with the same torch threads
per process, half the cores (as each of the two ranks gets): one process with all
of them is a different figure (on a busy 2-core machine, 2 threads ran an
experience 75 times slower than 1, OpenMP's threads spinning against the other
work). With fewer than two cores per rank the ranks compete for them, and the
figure shows what the collectives cost rather than a speed-up.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import zlib

from stream.bench.common import BenchWorld, LearnerFactory, Progress, ratio


def _threads() -> int:
    return max(1, (os.cpu_count() or 1) // 2)


def _rank_main(rank: int, world_size: int, init_file: str, config, items, rounds, out_dir: str) -> None:
    import torch

    torch.set_num_threads(_threads())
    collective = None
    if world_size > 1:
        import torch.distributed as dist

        from learners.continual.distributed import Collective

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        collective = Collective()
    from learners.learner import ContinualRecommender

    learner = ContinualRecommender(config, collective=collective)
    learner.add_items(items)
    started, trained = None, 0
    for k, events in enumerate(rounds):
        mine = [e for e in events if zlib.crc32(e.user_id.encode()) % world_size == rank]
        learner.observe_many(mine)
        learner.learn()
        if k == 0:
            started = time.perf_counter()  # after the warm-up experience
            if collective is not None:
                collective.seconds = 0.0
        else:
            trained += len(mine)
    if collective is not None:
        import torch.distributed as dist

        dist.barrier()  # the clock stops when the last rank is done
    seconds = time.perf_counter() - started
    in_collectives = collective.seconds if collective is not None else 0.0
    if collective is not None:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as out:
        json.dump({"seconds": seconds, "events": trained, "collective_seconds": in_collectives}, out)


def _measure(world_size: int, config, items, rounds) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="recstream-bench-dist-") as tmp:
        mp.spawn(_rank_main, args=(world_size, os.path.join(tmp, "init"), config, items, rounds, tmp),
                 nprocs=world_size, join=True)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"), encoding="utf-8")) for r in range(world_size)]
    seconds = max(r["seconds"] for r in ranks)
    events = sum(r["events"] for r in ranks)
    # Per rank, the share of its timed wall time spent in collectives (waiting for the other included).
    shares = [r["collective_seconds"] / r["seconds"] for r in ranks if r["seconds"] > 0]
    return {"ranks": world_size, "events": events, "seconds": round(seconds, 3),
            "events_per_s": round(events / seconds, 1) if seconds > 0 else None,
            "collective_share": round(sum(shares) / len(shares), 3) if shares else None}


def run(factory: LearnerFactory, world: BenchWorld, *, experiences: int, progress: Progress) -> dict:
    experiences = max(3, experiences)  # one timed experience is too few to say anything
    # A learner with a collective has no item-item head: the one-process side runs without it too.
    config = factory.config(item_item_dims=0)
    size = factory.settings.experience_size
    events = list(world.events(0, size * (1 + experiences), ts=lambda k: 1.7e9 + k, id_prefix="dist"))
    rounds = [events[i * size:(i + 1) * size] for i in range(1 + experiences)]
    items = world.items()
    one = _measure(1, config, items, rounds)
    progress(f"distributed: one process {one['events_per_s']} events/s")
    two = _measure(2, config, items, rounds)
    progress(f"distributed: two ranks {two['events_per_s']} events/s, {two['collective_share']:.0%} of their "
             "time in collectives")
    cores = os.cpu_count() or 1
    return {"one_rank": one, "two_ranks": two, "speedup": ratio(two["events_per_s"], one["events_per_s"]),
            "experience_size": size, "experiences": experiences, "cores": cores,
            "note": f"{cores} cores, {_threads()} torch thread(s) in every process"
                    + ("; they compete for the cores with each other and the machine's other work, so this "
                       "shows what the collectives cost rather than a speed-up" if cores < 4 else "")}
