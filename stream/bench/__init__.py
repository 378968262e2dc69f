"""``recstream bench``: how close the worker runs to what the hardware allows.

One run measures, side by side on the same machine and broker:

1. ingest    -- worker events/s (training paused) vs bare kafka-python + json.loads
2. training  -- Avalanche strategy samples/s (EWC, replay, stats, checkpoints) vs a bare PyTorch loop
3. freshness -- event -> user vector and model update -> item vectors, p50/p99, at a steady rate
4. memory    -- the worker's RSS over that steady run (growth after warm-up)
5. scale     -- ingest, freshness and the worker's RSS again at other user/item counts
                (``--scales grid``: 10,000 / 100,000 / 1,000,000 users x 1,000 / 10,000 / 100,000 items)
6. distributed (asked for by name) -- training events/s, one process vs two gloo ranks

Absolute figures depend on the machine and its neighbours; the ratios are
measured in the same run, rounds alternating, and are the figures to compare.

API::

    from stream.bench import BenchOptions, run_bench, markdown_table
    results = run_bench(BenchOptions(seconds=60, out="bench.json"))
    print(markdown_table(results))
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from stream.bench.report import markdown_table

log = logging.getLogger(__name__)

SCHEMA = "recstream-bench/1"
SECTIONS = ("ingest", "training", "freshness", "scale")  # memory is measured during freshness
EXTRA_SECTIONS = ("memory", "distributed")  # memory alone; distributed only when asked for
# The big scale grid (users, items): how each part's cost grows with users and with items apart.
SCALE_GRID = tuple((users, items) for users in (10_000, 100_000, 1_000_000) for items in (1_000, 10_000, 100_000))


def parse_scales(text: str) -> tuple:
    """``--scales``: comma-separated ``N`` (N users and N items), ``USERSxITEMS``, or ``grid``."""
    if text.strip() == "grid":
        return SCALE_GRID
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        users, _, items = part.partition("x")
        try:
            out.append((int(users), int(items or users)))
        except ValueError:
            raise ValueError(f"--scales takes N, USERSxITEMS or grid, comma-separated; not {part!r}") from None
    return tuple(out)


def _scale_pairs(scales) -> list[tuple[int, int]]:
    return [(n, n) if isinstance(n, int) else (int(n[0]), int(n[1])) for n in scales]


@dataclass(frozen=True)
class BenchOptions:
    device: str = "auto"
    seconds: float = 600.0           # the steady (freshness + memory) run; every other phase scales with it
    bootstrap_servers: Optional[str] = None
    out: Optional[str] = None
    users: int = 10_000
    items: int = 1_000
    rate: float = 1000.0
    producer_linger_ms: int = 50     # the load producer's linger.ms (its batches cost the embedded broker)
    scales: tuple = (1_000, 100_000)  # N (users = items = N) or (users, items); SCALE_GRID for the big grid
    sections: tuple[str, ...] = SECTIONS
    max_text_items: int = 2_000      # items that get a text (and are encoded); the rest are id-only
    model: Optional[str] = None
    seed: int = 0
    rounds: Optional[int] = None     # default: 3 from --seconds 60 up, else 1
    settings: dict = field(default_factory=dict)  # extra Settings fields for every worker and learner

    def plan(self) -> dict:
        s = float(self.seconds)
        rounds = self.rounds or (3 if s >= 60 else 1)
        # One checkpoint per round of 30 experiences (15,360 events: every 15 s at 1,000 events/s,
        # 4x the worker's default --checkpoint-interval-s of 60). With 10 experiences (1 s of
        # training on the default model) the saves were a sixth of the figure: a cadence no
        # worker runs.
        experiences = int(min(30, max(1, s // 20)))
        return {
            # A round times the polls after its first: 12,000 events left about five polls of
            # 2,000 in the window, too few for a stable median (docs/performance.md).
            "ingest_events": int(min(100_000, max(3_000 if s < 60 else 40_000, 200 * s))),
            "rounds": rounds,
            # Ingest rounds last seconds each, and one neighbour's spike moved a round's ratio by
            # 0.3 (0.41-1.09 on this machine): five rounds make the median hold.
            "ingest_rounds": max(rounds, 5) if s >= 60 else rounds,
            "training_experiences_per_round": experiences,
            "checkpoint_every": experiences,
            "steady_seconds": s,
            "memory_sample_every_s": 10.0 if s >= 300 else max(1.0, s / 30),
            "memory_warmup_s": s / 10,  # the first minute of the full ten
            "scale_seconds": min(60.0, max(10.0, s / 10)),
        }


def run_bench(options: BenchOptions, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the sections asked for; returns (and with ``out``, writes) the results dict."""
    from stream.bench import distributed, freshness, ingest, training
    from stream.bench.common import BenchWorld, Cluster, LearnerFactory, remove_state_dirs
    from stream.config import Settings
    from stream.learner_setup import set_torch_threads

    progress = progress or (lambda message: log.info("%s", message))
    unknown = set(options.sections) - set(SECTIONS) - set(EXTRA_SECTIONS)
    if unknown:
        raise ValueError(f"unknown bench sections {sorted(unknown)}; choose from "
                         f"{', '.join(SECTIONS + EXTRA_SECTIONS)}")
    plan = options.plan()
    base = Settings(**{"device": options.device, "seed": options.seed, "metrics_port": 0,
                       **({"model": options.model} if options.model else {}), **options.settings})
    # Torch threads as the worker sets them (one core left to the loop with background training),
    # for every section: before, the training figure ran on torch's default unless the ingest
    # section's workers had set it first (0.84 alone on 2 threads, 0.73 after ingest on 1).
    set_torch_threads(base)
    results: dict = {"schema": SCHEMA, "started": time.time(), "options": _jsonable(asdict(options)),
                     "plan": plan, "host": _host(base)}
    world = BenchWorld(options.users, options.items, options.max_text_items, options.seed)
    cluster = Cluster(options.bootstrap_servers, base)
    results["broker"] = "embedded tansu" if cluster.embedded else options.bootstrap_servers
    factory = LearnerFactory(cluster.settings)
    sections = set(options.sections)
    try:
        if "ingest" in sections:
            results["ingest"] = ingest.run(cluster, factory, world, events=plan["ingest_events"],
                                           rounds=plan["ingest_rounds"], progress=progress)
            _write(options.out, results)
        if "training" in sections:
            results["training"] = training.run(
                factory, world, experiences_per_round=plan["training_experiences_per_round"],
                rounds=plan["rounds"], checkpoint_every=plan["checkpoint_every"], progress=progress)
            _write(options.out, results)
        if "freshness" in sections or "memory" in sections:
            steady = freshness.run(cluster, world, seconds=plan["steady_seconds"], rate=options.rate,
                                   linger_ms=options.producer_linger_ms,
                                   sample_every_s=plan["memory_sample_every_s"],
                                   warmup_s=plan["memory_warmup_s"], progress=progress)
            results["memory"] = steady.pop("memory")
            results["freshness"] = steady
            _write(options.out, results)
        if "scale" in sections:
            results["scale"] = []
            for users, items in _scale_pairs(options.scales):
                scaled = BenchWorld(users, items, options.max_text_items, options.seed)
                row = {"users": users, "items": items, "item_texts": min(items, options.max_text_items)}
                tag = f"scale{users}x{items}"
                row["ingest"] = ingest.run(cluster, factory, scaled, events=plan["ingest_events"], rounds=1,
                                           progress=progress, phase=f"{tag}-ingest")
                row["freshness"] = freshness.run(cluster, scaled, seconds=plan["scale_seconds"], rate=options.rate,
                                                 linger_ms=options.producer_linger_ms,
                                                 sample_every_s=max(1.0, plan["scale_seconds"] / 10),
                                                 warmup_s=0.0, progress=progress, phase=tag)
                # The worker process's resident memory at the end of its steady run, and its peak.
                memory = row["freshness"].get("memory", {})
                row["rss_mb"], row["rss_peak_mb"] = memory.get("rss_end_mb"), memory.get("rss_peak_mb")
                results["scale"].append(row)
                _write(options.out, results)
        if "distributed" in sections:
            results["distributed"] = distributed.run(
                factory, world, experiences=plan["training_experiences_per_round"], progress=progress)
            _write(options.out, results)
        results["catalogue_encoding"] = {
            "texts": factory.encoded_texts, "seconds": round(factory.encode_seconds, 2),
            "texts_per_s": round(factory.encoded_texts / factory.encode_seconds, 1)
            if factory.encode_seconds else None}
    finally:
        cluster.close()
        remove_state_dirs()
    results["finished"] = time.time()
    results["host"]["load_average_end"] = list(os.getloadavg())
    _write(options.out, results)
    return results


def _host(settings) -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_start": list(os.getloadavg()), "device": settings.device}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        import psutil

        info["memory_total_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:  # pragma: no cover
        pass
    return info


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _write(path: Optional[str], results: dict) -> None:
    """Write after every section, so an interrupted run keeps what it measured."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    os.replace(tmp, path)


__all__ = ["BenchOptions", "run_bench", "markdown_table", "parse_scales", "SECTIONS", "SCHEMA", "SCALE_GRID"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: recstream bench --help")
