"""The measuring steps of ``benchmarks/gpu.sh``, one per call, each writing its own JSON.

    python benchmarks/gpu_steps.py training  --model PATH --label minilm --device cuda --out training-minilm.json
    python benchmarks/gpu_steps.py freshness --device cuda --out freshness.json
    python benchmarks/gpu_steps.py encoding  --model minilm=PATH --model qwen2=PATH --device cuda --out encoding.json
    python benchmarks/gpu_steps.py evaluate  --data DIR --device cuda --out evaluate.json [--cpu-reference F]

Every step rewrites its JSON after each configuration it finishes, so a step
that is killed by its time limit keeps what it measured. ``--tiny`` shrinks
every size for the CPU rehearsal (tests/test_gpu_script.py). Peak memory is
``torch.cuda.max_memory_allocated`` of this process (in training: the bench's
two learners, the strategy's and the bare loop's); the freshness worker runs
in a process of its own, so there it is the device's used memory as
``nvidia-smi`` reports it, all processes (null on a CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("gpu_steps")

TRAINING_MODES = (("frozen", "top", 0), ("top2", "top", 2), ("lora2", "lora", 2))
P99_LIMIT_S = 0.5
STRATEGIES = ("naive", "ewc_replay")


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


class CudaPeak:
    """``torch.cuda.max_memory_allocated`` over a block (None on a CPU)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device == "cuda" and torch.cuda.is_available()
        self.bytes: Optional[int] = None

    def __enter__(self) -> "CudaPeak":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.bytes = int(torch.cuda.max_memory_allocated())


class DeviceMemorySampler(threading.Thread):
    """The device's used memory (``nvidia-smi``, all processes) sampled twice a second: the peak of a
    block whose GPU work runs in another process. ``peak_bytes`` stays None without ``nvidia-smi``."""

    def __init__(self, device: str) -> None:
        super().__init__(name="device-memory", daemon=True)
        self.enabled = device == "cuda" and shutil.which("nvidia-smi") is not None
        self.peak_bytes: Optional[int] = None
        self._stop_event = threading.Event()

    def __enter__(self) -> "DeviceMemorySampler":
        if self.enabled:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_event.set()
        if self.enabled:
            self.join(timeout=5)

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "--id=0"], capture_output=True, text=True, timeout=5).stdout
                used = int(float(out.split()[0]) * 2 ** 20)
                self.peak_bytes = max(self.peak_bytes or 0, used)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop_event.wait(0.5)


# -- 1. training ----------------------------------------------------------------------------------

def training(args) -> None:
    from stream.bench import BenchOptions, run_bench

    out = {"model": args.model, "label": args.label, "device": args.device, "modes": {}}
    # The bench's --seconds sets only the plan here: one experience per round for every 20 s
    # (10 on the GPU: a few seconds each, the model loads dominate the step).
    seconds, rounds = (20.0, 1) if args.tiny else (200.0, 2)
    for name, params, layers in TRAINING_MODES:
        started = time.perf_counter()
        try:
            with CudaPeak(args.device) as peak:
                results = run_bench(BenchOptions(
                    device=args.device, seconds=seconds, rounds=rounds, sections=("training",),
                    users=200 if args.tiny else 10_000, items=100 if args.tiny else 1_000,
                    max_text_items=100 if args.tiny else 1_000, model=args.model,
                    settings={"train_params": params, "train_layers": layers}))
            t = results["training"]
            row = {"train_params": params, "train_layers": layers, "autocast": t["autocast"],
                   "avalanche_samples_per_s": t["avalanche_samples_per_s"],
                   "bare_samples_per_s": t["bare_samples_per_s"],
                   "learn_wall_samples_per_s": t["learn_wall_samples_per_s"], "ratio": t["ratio"],
                   "experiences": t["experiences_per_round"] * t["rounds"], "experience_size": t["experience_size"],
                   "batch_size": t["batch_size"], "max_text_tokens": t["max_text_tokens"],
                   "cuda_peak_bytes": peak.bytes}
        except Exception as exc:  # noqa: BLE001 - one mode's failure is recorded, the others still run
            log.exception("training %s %s failed", args.label, name)
            row = {"train_params": params, "train_layers": layers, "error": f"{type(exc).__name__}: {exc}"}
        row["seconds"] = round(time.perf_counter() - started, 1)
        out["modes"][name] = row
        write_json(args.out, out)
        print(f"training {args.label} {name}: {row.get('avalanche_samples_per_s', row.get('error'))}", flush=True)


# -- 2. freshness ---------------------------------------------------------------------------------

def freshness(args) -> None:
    from stream.bench import BenchOptions, run_bench

    deadline = time.monotonic() + args.budget_s
    users = 1_000 if args.tiny else 10_000
    items = 100 if args.tiny else 1_000
    first = (1_000.0, 5.0 if args.tiny else 20.0)  # 20,000 events: 200 above the p99
    # Doubling from 1,000/s up (halving when 1,000/s misses), one short run each, until p99 > 0.5 s
    # or the budget cannot hold another run.
    up = (2_000.0,) if args.tiny else (2_000.0, 4_000.0, 8_000.0, 16_000.0)
    down = (500.0,) if args.tiny else (500.0, 250.0)
    search_seconds = 3.0 if args.tiny else 10.0
    out = {"device": args.device, "users": users, "items": items, "p99_limit_s": P99_LIMIT_S, "runs": []}

    def measure(rate: float, seconds: float) -> bool:
        started = time.perf_counter()
        try:
            with DeviceMemorySampler(args.device) as sampler:
                results = run_bench(BenchOptions(device=args.device, seconds=seconds, rate=rate, users=users,
                                                 items=items, max_text_items=items, sections=("freshness",)))
            f = results["freshness"]
            visible = f["event_to_vector"]["visible"]
            row = {"rate_events_per_s": rate, "seconds": seconds, "events_sent": f["events_sent"],
                   "events_unserved": f["events_unserved"], "producer_behind_max_s": f["producer_behind_max_s"],
                   "p50_s": visible["p50_s"], "p99_s": visible["p99_s"], "n": visible["n"],
                   "item_refresh_p99_s": f["item_refresh"]["p99_s"],
                   # device-wide: the worker's process plus this one's CUDA context
                   "device_memory_used_peak_bytes": sampler.peak_bytes}
            # Unserved events or a producer that fell behind its schedule mean the rate was not offered.
            row["ok"] = bool(visible["p99_s"] is not None and visible["p99_s"] <= P99_LIMIT_S
                             and not f["events_unserved"] and f["producer_behind_max_s"] < 1.0)
        except Exception as exc:  # noqa: BLE001 - recorded; the search stops at a failed rate
            log.exception("freshness at %s events/s failed", rate)
            row = {"rate_events_per_s": rate, "seconds": seconds, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        row["wall_s"] = round(time.perf_counter() - started, 1)
        out["runs"].append(row)
        passing = [r["rate_events_per_s"] for r in out["runs"] if r["ok"]]
        out["highest_rate_p99_within_limit"] = max(passing) if passing else None
        write_json(args.out, out)
        print(f"freshness {rate:.0f}/s: p50 {row.get('p50_s')} p99 {row.get('p99_s')} ok {row['ok']}", flush=True)
        return row["ok"]

    at_1000 = measure(*first)
    out["at_1000"] = dict(out["runs"][0])
    write_json(args.out, out)
    for rate in (up if at_1000 else down):
        # A run costs its seconds plus the worker's start and stop, as long as the last run's overhead.
        cost = out["runs"][-1]["wall_s"] - out["runs"][-1]["seconds"] + search_seconds
        if time.monotonic() + cost > deadline:
            out["search_stopped"] = f"the {args.budget_s:.0f} s budget holds no run at {rate:.0f} events/s"
            write_json(args.out, out)
            break
        if measure(rate, search_seconds) != at_1000:
            break


# -- 3. item encoding ------------------------------------------------------------------------------

def encoding(args) -> None:
    import torch

    from learners.learner import ContinualRecommender, LearnerConfig
    from stream.bench.common import BenchWorld

    n = 48 if args.tiny else 5_000
    items = BenchWorld(1, n, n).items()
    out = {"device": args.device, "texts": n, "train_layers": 2, "encoders": {}}
    for label, path in (spec.split("=", 1) for spec in args.model):
        try:
            with CudaPeak(args.device) as peak:
                learner = ContinualRecommender(LearnerConfig(model_path=path, device=args.device, train_layers=2,
                                                             seed=0))
                learner.add_items(items[:16])  # warm-up: kernels, tokenizer
                t0 = time.perf_counter()
                learner.add_items(items[16:])
                if learner.device.type == "cuda":
                    torch.cuda.synchronize()
                new_s = time.perf_counter() - t0
                rows = torch.arange(len(learner.catalogue))
                t0 = time.perf_counter()
                # What follows every model update: the trained top over the cached bottom states.
                learner._refresh_pooled(rows)  # noqa: SLF001 - the re-embedding itself, nothing around it
                if learner.device.type == "cuda":
                    torch.cuda.synchronize()
                refresh_s = time.perf_counter() - t0
            row = {"model": path, "new_item_texts_per_s": round((n - 16) / new_s, 1),
                   "reembed_texts_per_s": round(len(rows) / refresh_s, 1), "max_text_tokens":
                   learner.config.max_text_tokens, "cuda_peak_bytes": peak.bytes}
            del learner
        except Exception as exc:  # noqa: BLE001 - recorded, the next encoder still runs
            log.exception("encoding %s failed", label)
            row = {"model": path, "error": f"{type(exc).__name__}: {exc}"}
        out["encoders"][label] = row
        write_json(args.out, out)
        print(f"encoding {label}: {row}", flush=True)


# -- 4. evaluation ---------------------------------------------------------------------------------

def tiny_files(events_path: Path, items_path: Path, folder: Path, events: int, items: int) -> tuple[Path, Path]:
    """The first ``events`` events (the file is in stream order) on the first ``items`` items seen,
    and those items: few texts to encode on a CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    kept, names = [], set()
    with open(events_path) as fh:
        for line in fh:
            if len(kept) >= events:
                break
            item_id = json.loads(line)["item_id"]
            if item_id in names or len(names) < items:
                names.add(item_id)
                kept.append(line)
    with open(items_path) as fh:
        items = [line for line in fh if json.loads(line)["item_id"] in names]
    (folder / "events.jsonl").write_text("".join(kept))
    (folder / "items.jsonl").write_text("".join(items))
    return folder / "events.jsonl", folder / "items.jsonl"


def compare(figures: dict, reference: dict, tolerance: float) -> dict:
    """Per strategy and metric: this run, the reference, the difference and whether it is within tolerance."""
    out = {}
    for name, mine in figures.items():
        theirs = reference.get("strategies", {}).get(name)
        if not theirs:
            continue
        rows = {}
        for key in sorted(k for k in mine if k.startswith(("recall@", "ndcg@"))):
            if key in theirs:
                diff = round(mine[key] - theirs[key], 4)
                rows[key] = {"this": mine[key], "reference": theirs[key], "diff": diff,
                             "within": abs(diff) <= tolerance}
        out[name] = rows
    return out


def evaluate(args) -> None:
    from click.testing import CliRunner

    from stream.cli import main as cli

    work = Path(args.work)
    out = {"device": args.device, "strategies": list(STRATEGIES), "data": args.data, "tolerance": args.tolerance}
    write_json(args.out, out)
    converted = work / "movielens"
    result = CliRunner().invoke(cli, ["convert", "movielens", args.data, "--out", str(converted)])
    if result.exit_code:
        raise SystemExit(f"recstream convert movielens failed: {result.output}")
    events, items = converted / "events.jsonl", converted / "items.jsonl"
    blocks = args.blocks
    if args.tiny:
        events, items = tiny_files(events, items, work / "tiny", events=600, items=40)
        blocks = 3
    out.update(events=str(events), blocks=blocks)
    # Beside the step's JSON, not in the scratch folder: the runner rewrites it after each strategy,
    # so a step stopped by its limit still leaves the strategies it finished.
    results_path = Path(args.out).with_name(f"evaluate-results-{args.device}.json")
    out["results"] = str(results_path)
    argv = ["evaluate", "--events", str(events), "--items", str(items), "--out", str(results_path),
            "--blocks", str(blocks), "--strategies", ",".join(STRATEGIES), "--device", args.device]
    out["command"] = "recstream " + " ".join(argv)
    started = time.perf_counter()
    with CudaPeak(args.device) as peak:
        result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["cuda_peak_bytes"] = peak.bytes
    if result.exit_code:
        detail = repr(result.exception) if result.exception else result.output[-2000:]
        raise SystemExit(f"recstream evaluate failed (exit {result.exit_code}): {detail}")
    results = json.loads(results_path.read_text())
    keep = ("recall@10", "ndcg@10", "bwt", "train_seconds", "samples_trained")
    out["figures"] = {name: {**{k: s.get(k) for k in keep}, "cold_ndcg@10": (s.get("cold") or {}).get("ndcg@10")}
                      for name, s in results["strategies"].items()}
    if args.cpu_reference:
        reference = json.loads(Path(args.cpu_reference).read_text())
        out["cpu_reference"] = {"path": args.cpu_reference, "events": reference.get("events"),
                                "blocks": reference.get("blocks")}
        if (reference.get("events"), reference.get("blocks")) != (results.get("events"), results.get("blocks")):
            out["cpu_reference"]["note"] = "different events or blocks: not compared"
        else:
            out["cpu_reference"]["comparison"] = compare(out["figures"], reference, args.tolerance)
    else:
        out["cpu_reference"] = None
    write_json(args.out, out)
    print(f"evaluate: {out['figures']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("training", "freshness", "encoding", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
        p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU rehearsal)")
        p.add_argument("--out", required=True)
    sub.choices["freshness"].add_argument("--budget-s", type=float, default=100.0,
                                          help="no rate search run starts that would end after this")
    sub.choices["training"].add_argument("--model", required=True, help="model folder")
    sub.choices["training"].add_argument("--label", required=True)
    sub.choices["encoding"].add_argument("--model", action="append", required=True, help="LABEL=FOLDER")
    ev = sub.choices["evaluate"]
    ev.add_argument("--data", required=True, help="a MovieLens folder (ml-latest-small)")
    ev.add_argument("--work", required=True, help="scratch folder for the converted files and results")
    ev.add_argument("--blocks", type=int, default=10)
    ev.add_argument("--cpu-reference", default=None,
                    help="`recstream evaluate` results JSON of the same files and blocks on a CPU")
    ev.add_argument("--tolerance", type=float, default=0.01,
                    help="largest Recall/NDCG difference from the reference taken as seed noise")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import warnings

    warnings.filterwarnings("ignore")
    {"training": training, "freshness": freshness, "encoding": encoding, "evaluate": evaluate}[args.step](args)


if __name__ == "__main__":
    main()
