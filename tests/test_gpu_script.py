"""benchmarks/gpu.sh rehearsed on the CPU at tiny sizes: every section written, with figures or its error.

The GPU run executes the same steps at full size; what runs there has run here first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from numbers import Number
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
MOVIELENS = next((p for p in (ROOT.parent / "shared/data/movielens-latest-small",
                              ROOT / "shared/data/movielens-latest-small") if (p / "ratings.csv").is_file()), None)

sys.path.insert(0, str(ROOT / "benchmarks"))


def _figure_or_error(section: dict, *keys: str) -> None:
    """Each key holds a number, or the section says why not."""
    if section.get("error"):
        assert isinstance(section["error"], (str, dict))
        return
    for key in keys:
        assert isinstance(section.get(key), Number), (key, section)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu")
    # A stand-in CPU reference of the tiny evaluation's size (600 events, 3 blocks): the comparison runs.
    reference = tmp_path_factory.mktemp("reference") / "cpu.json"
    reference.write_text(json.dumps({"events": 600, "blocks": 3,
                                     "strategies": {"naive": {"recall@10": 0.0, "ndcg@10": 0.0}}}))
    args = ["bash", str(SCRIPT), str(out), "--device", "cpu", "--tiny", "--cpu-reference", str(reference)]
    if MOVIELENS is None:  # without the shared data set, a small synthetic MovieLens folder stands in
        args += ["--data", str(_synthetic_movielens(tmp_path_factory.mktemp("ml")))]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "LIMIT_SCALE": os.environ.get("LIMIT_SCALE", "6")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), proc


def _synthetic_movielens(folder: Path) -> Path:
    movies = ["movieId,title,genres"] + [f"{i},Movie {i} ({1990 + i % 30}),Drama|Comedy" for i in range(1, 41)]
    ratings = ["userId,movieId,rating,timestamp"] + [
        f"{u},{1 + (u * 7 + k) % 40},{1 + (u + k) % 5}.0,{1_000_000 + u * 100 + k}"
        for u in range(1, 61) for k in range(10)]
    (folder / "movies.csv").write_text("\n".join(movies) + "\n")
    (folder / "ratings.csv").write_text("\n".join(ratings) + "\n")
    return folder


@pytest.mark.slow
@pytest.mark.integration
def test_every_section_has_figures_or_an_error(rehearsal):
    summary, proc = rehearsal
    assert summary["schema"] == "recstream-gpu/1" and summary["device"] == "cpu"
    for model in ("minilm", "qwen2_0.5b_random"):
        section = summary["training"][model]
        if section.get("error") and not section.get("modes"):
            continue
        assert set(section["modes"]) == {"frozen", "top2", "lora2"}
        for row in section["modes"].values():
            _figure_or_error(row, "avalanche_samples_per_s", "bare_samples_per_s")
    fresh = summary["freshness"]
    if not fresh.get("error"):
        _figure_or_error(fresh["at_1000"], "p50_s", "p99_s")
        assert fresh["runs"] and "highest_rate_p99_within_limit" in fresh
        passing = [r["rate_events_per_s"] for r in fresh["runs"] if r["ok"]]
        assert fresh["highest_rate_p99_within_limit"] == (max(passing) if passing else None)
    encoders = summary["encoding"].get("encoders") or {}
    assert set(encoders) == {"minilm", "qwen2-0.5b-random"} or summary["encoding"].get("error")
    for row in encoders.values():
        _figure_or_error(row, "new_item_texts_per_s", "reembed_texts_per_s")
    evaluation = summary["evaluate"]
    if not evaluation.get("error"):
        assert set(evaluation["figures"]) == {"naive", "ewc_replay"}
        for figures in evaluation["figures"].values():
            _figure_or_error(figures, "recall@10", "ndcg@10")
        ndcg = evaluation["cpu_reference"]["comparison"]["naive"]["ndcg@10"]
        assert ndcg["reference"] == 0.0 and ndcg["diff"] == round(evaluation["figures"]["naive"]["ndcg@10"], 4)
    # On a CPU every peak is null, but each measurement has its entry.
    peak = summary["peak_memory"]
    assert all(v is None for v in peak["training"].values()) and peak["evaluate"] is None
    assert "| training minilm frozen |" in proc.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_the_rehearsal_measured_every_step(rehearsal):
    """At tiny sizes nothing should need its error path: each step's own figures are there."""
    summary, _ = rehearsal
    failed = [name for name, section in (("decoder", summary["decoder"]), ("freshness", summary["freshness"]),
                                         ("encoding", summary["encoding"]), ("evaluate", summary["evaluate"]),
                                         *summary["training"].items()) if section.get("error")]
    assert not failed, {name: summary.get(name) for name in failed}


def test_a_failed_step_keeps_what_it_measured(tmp_path):
    import gpu_report

    out = tmp_path / "freshness.json"
    out.write_text(json.dumps({"runs": [{"rate_events_per_s": 1000.0, "ok": True}]}))
    log = tmp_path / "freshness.log"
    log.write_text("starting\nTraceback: boom\n")
    gpu_report.record_error(out, "freshness", 124, 110, log)
    data = json.loads(out.read_text())
    assert data["runs"][0]["ok"] is True
    assert data["error"]["timed_out"] is True and data["error"]["log_tail"][-1] == "Traceback: boom"
    summary = gpu_report.merge(tmp_path, "cuda")
    assert summary["freshness"]["error"]["step"] == "freshness"
    assert summary["training"]["minilm"]["error"]["message"] == "the step wrote nothing"
    assert "stopped by its 110 s limit" in gpu_report.table(summary)


def test_comparison_with_the_cpu_reference():
    import gpu_steps

    mine = {"naive": {"recall@10": 0.25, "ndcg@10": 0.26, "bwt": -0.2}}
    reference = {"strategies": {"naive": {"recall@10": 0.245, "ndcg@10": 0.28}}}
    rows = gpu_steps.compare(mine, reference, tolerance=0.01)["naive"]
    assert rows["recall@10"]["within"] is True and rows["ndcg@10"]["within"] is False
    assert "bwt" not in rows


def test_without_a_venv_it_says_so_and_stops(tmp_path):
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    (tree / "benchmarks" / "gpu.sh").write_text(SCRIPT.read_text())
    proc = subprocess.run(["bash", str(tree / "benchmarks" / "gpu.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert "no usable venv" in proc.stderr
    summary = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert summary["error"].startswith("no usable venv") and summary["device"] == "cuda"
