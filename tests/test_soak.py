"""benchmarks/soak.py: the per-interval p99, the curve's rows and a smoke run of the whole script on a
stand-in steady run (the real one is the bench's freshness run, tested in tests/test_bench.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from stream.bench.common import LatencyHistogram

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interval_quantile_reads_only_the_latencies_added_since_the_last_snapshot(soak):
    hist = LatencyHistogram(max_s=5.0)
    for _ in range(100):
        hist.add(2.0)  # a slow first interval
    before = hist.counts.copy()
    for ms in range(1, 101):
        hist.add(ms / 1000)
    assert soak.interval_quantile(before, hist.counts, 0.99) == pytest.approx(0.1)
    assert soak.interval_quantile(None, hist.counts, 0.99) == pytest.approx(2.001)
    assert soak.interval_quantile(hist.counts, hist.counts, 0.99) is None


def test_curve_rows_carry_memory_latency_and_fill(soak):
    curve = soak.Curve()
    matcher = SimpleNamespace(visible=LatencyHistogram(max_s=5.0))
    curve.sample(0.0, 500 * 2 ** 20, matcher, None)
    for _ in range(10):
        matcher.visible.add(0.25)
    curve.sample(60.0, 520 * 2 ** 20, matcher, {"replay_samples": 50, "replay_size": 200, "users": 10,
                                                "max_users": 1000, "dedup_ledger_ids": 5, "dedup_window": 10,
                                                "model_version": 3})
    first, second = curve.rows
    assert first["served"] == 0 and first["event_p99_s"] is None and first["replay_fill"] is None
    assert second == {"t_min": 1.0, "rss_mb": 520.0, "served": 10, "event_p99_s": 0.251, "replay_fill": 0.25,
                      "users": 10, "users_fill": 0.01, "dedup_fill": 0.5, "model_version": 3}
    assert "251 ms" in soak.format_row(second)


def test_soak_writes_the_curve_as_json_and_png(soak, tmp_path, monkeypatch):
    from stream.bench import freshness

    def steady_run(cluster, world, *, seconds, sample_every_s, on_sample, **_):
        matcher = SimpleNamespace(visible=LatencyHistogram())
        for k in range(4):
            matcher.visible.add(0.1 * (k + 1))
            on_sample(k * sample_every_s, (400 + k) * 2 ** 20, matcher,
                      {"replay_samples": 10 * k, "replay_size": 100, "users": k, "max_users": 10})
        return {"memory": {"rss_at_warmup_mb": 400.0, "rss_end_mb": 403.0, "rss_peak_mb": 403.0,
                           "growth": 0.0075, "slope_mb_per_min": 1.0},
                "event_to_vector": {"visible": {"n": 4, "p50_s": 0.2, "p99_s": 0.4}},
                "worker": {"sizes": {"replay_samples": 30}}, "events_sent": 4, "events_unserved": 0}

    class NoCluster:
        def __init__(self, *_):
            pass

        def close(self):
            pass

    import stream.learner_setup

    monkeypatch.setattr(stream.learner_setup, "set_torch_threads", lambda settings: None)  # this process's own
    monkeypatch.setattr(freshness, "run", steady_run)
    monkeypatch.setattr(soak, "Cluster", NoCluster)
    out = tmp_path / "soak"
    assert soak.main(["--minutes", "0.5", "--out", str(out)]) == 0
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["sample_every_s"] == 3.0 and [row["rss_mb"] for row in data["curve"]] == [400, 401, 402, 403]
    assert data["curve"][-1]["replay_fill"] == 0.3 and data["memory"]["growth"] == 0.0075
    png = (tmp_path / "soak.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert np.isclose(data["curve"][1]["event_p99_s"], 0.201)
