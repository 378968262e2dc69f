"""The bookkeeping of ``benchmarks/gpu.sh``: a failed step's error, then every step's JSON in one file and a table.

    python benchmarks/gpu_report.py error OUT/step.json --step NAME --rc 124 --limit 90 --log OUT/step.log
    python benchmarks/gpu_report.py summary OUT --device cuda

``error`` keeps whatever the step wrote before it failed and adds what went
wrong (exit status, whether its time limit ended it, the log's last lines).
``summary`` writes ``OUT/gpu.json``: one section per measurement (training,
freshness, encoding, evaluate, peak_memory), each holding its figures, the
step's recorded error, or both when a step failed part way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

SCHEMA = "recstream-gpu/1"
STEPS = ("decoder", "training-minilm", "training-qwen2", "freshness", "encoding", "evaluate")
TIMEOUT_CODES = (124, 137)  # timeout(1): limit reached; 128 + SIGKILL: still running after --kill-after


def read(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def record_error(out: Path, step: str, rc: int, limit_s: float, log: Optional[Path]) -> dict:
    data = read(out) or {}
    tail = []
    if log is not None and log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-15:]
    timed_out = rc in TIMEOUT_CODES
    data["error"] = {"step": step, "rc": rc, "timed_out": timed_out, "limit_s": limit_s,
                     "message": f"stopped by its {limit_s:.0f} s limit" if timed_out else f"exited with {rc}",
                     "log_tail": tail}
    write(out, data)
    return data


def _step(out: Path, name: str) -> dict:
    return read(out / f"{name}.json") or {"error": {"step": name, "message": "the step wrote nothing"}}


def merge(out: Path, device: str) -> dict:
    steps = {name: _step(out, name) for name in STEPS}
    training = {"minilm": steps["training-minilm"], "qwen2_0.5b_random": steps["training-qwen2"]}
    peak: dict = {"unit": "bytes", "training": {}, "encoding": {}}
    for model, section in training.items():
        for mode, row in (section.get("modes") or {}).items():
            peak["training"][f"{model}/{mode}"] = row.get("cuda_peak_bytes")
    for model, row in (steps["encoding"].get("encoders") or {}).items():
        peak["encoding"][model] = row.get("cuda_peak_bytes")
    peak["freshness_device_used"] = {str(r["rate_events_per_s"]): r.get("device_memory_used_peak_bytes")
                                     for r in steps["freshness"].get("runs") or []}
    peak["evaluate"] = steps["evaluate"].get("cuda_peak_bytes")
    return {"schema": SCHEMA, "device": device, "written": time.time(), "host": _host(),
            "decoder": steps["decoder"], "training": training, "freshness": steps["freshness"],
            "encoding": steps["encoding"], "evaluate": steps["evaluate"], "peak_memory": peak}


def _host() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        info["gpu"] = gpu or None
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2 ** 20:,.0f} MiB"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _error(section: dict) -> str:
    error = section.get("error")
    if not error:
        return ""
    return error if isinstance(error, str) else error.get("message", "error")


def table(summary: dict) -> str:
    lines = [f"GPU figures ({summary['device']}; {summary['host'].get('gpu') or 'no GPU'})", "",
             "| measurement | figure | peak memory |", "|---|---:|---:|"]
    for model, section in summary["training"].items():
        for mode, row in (section.get("modes") or {}).items():
            figure = row.get("error") or f"{_num(row.get('avalanche_samples_per_s'))} samples/s"
            lines.append(f"| training {model} {mode} | {figure} | {_mib(row.get('cuda_peak_bytes'))} |")
        if _error(section):
            lines.append(f"| training {model} | {_error(section)} | |")
    fresh = summary["freshness"]
    first = fresh.get("at_1000") or {}
    figure = first.get("error") or f"p50 {_num(first.get('p50_s'), 3)} s, p99 {_num(first.get('p99_s'), 3)} s"
    lines.append(f"| event -> user vector at 1,000/s | {figure} | {_mib(first.get('device_memory_used_peak_bytes'))} |")
    tried = ", ".join(f"{r['rate_events_per_s']:.0f}{'' if r.get('ok') else ' (over)'}"
                      for r in fresh.get("runs") or [])
    lines.append(f"| highest rate with p99 <= {fresh.get('p99_limit_s', 0.5)} s | "
                 f"{_num(fresh.get('highest_rate_p99_within_limit'), 0)} events/s (tried {tried or '-'}) | |")
    if _error(fresh):
        lines.append(f"| freshness | {_error(fresh)} | |")
    for model, row in (summary["encoding"].get("encoders") or {}).items():
        figure = row.get("error") or (f"{_num(row.get('reembed_texts_per_s'))} re-embedded texts/s, "
                                      f"{_num(row.get('new_item_texts_per_s'))} new texts/s")
        lines.append(f"| item encoding {model} | {figure} | {_mib(row.get('cuda_peak_bytes'))} |")
    if _error(summary["encoding"]):
        lines.append(f"| item encoding | {_error(summary['encoding'])} | |")
    evaluation = summary["evaluate"]
    comparison = (evaluation.get("cpu_reference") or {}).get("comparison") or {}
    for name, figures in (evaluation.get("figures") or {}).items():
        versus = comparison.get(name, {}).get("ndcg@10")
        note = f" (CPU {versus['reference']:.4f}, {'within' if versus['within'] else 'OUTSIDE'} " \
               f"{evaluation['tolerance']})" if versus else ""
        lines.append(f"| evaluate {name} NDCG@10 | {_num(figures.get('ndcg@10'), 4)}{note} | "
                     f"{_mib(evaluation.get('cuda_peak_bytes'))} |")
    if _error(evaluation):
        lines.append(f"| evaluate | {_error(evaluation)} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    err = sub.add_parser("error")
    err.add_argument("out", type=Path)
    err.add_argument("--step", required=True)
    err.add_argument("--rc", type=int, required=True)
    err.add_argument("--limit", type=float, required=True)
    err.add_argument("--log", type=Path, default=None)
    summ = sub.add_parser("summary")
    summ.add_argument("folder", type=Path)
    summ.add_argument("--device", required=True)
    args = parser.parse_args()
    if args.command == "error":
        record_error(args.out, args.step, args.rc, args.limit, args.log)
        return
    summary = merge(args.folder, args.device)
    write(args.folder / "gpu.json", summary)
    print(table(summary))
    print(f"\nwritten to {args.folder / 'gpu.json'}")


if __name__ == "__main__":
    main()
