"""``recstream bench`` runs end to end in a reduced mode and writes the JSON shape the
tables of docs/performance.md are built from. Shape only: no timing is asserted
(the figures depend on the machine and its neighbours)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from stream.bench import SCALE_GRID, SCHEMA, BenchOptions, markdown_table, parse_scales
from stream.bench.common import BenchWorld, LatencyHistogram
from stream.cli import main

pytestmark = pytest.mark.integration


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) for v in values)


def test_bench_command_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [
        "bench", "--seconds", "5", "--device", "cpu", "--users", "200", "--items", "60", "--scales", "300",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| figure |" in result.output  # the Markdown table is printed

    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA
    assert data["plan"]["steady_seconds"] == 5
    assert {"cpus", "torch", "load_average_start", "load_average_end"} <= data["host"].keys()

    ingest = data["ingest"]
    assert _numbers(ingest["bare_events_per_s"], ingest["worker_events_per_s"],
                    ingest["worker_publish_events_per_s"], ingest["ratio"], ingest["ratio_with_publish"])
    assert ingest["target_ratio"] == 0.8 and isinstance(ingest["met"], bool)
    assert _numbers(ingest["bare_produce_events_per_s"], ingest["publish_ratio"])
    assert ingest["publish_target_ratio"] == 0.5 and isinstance(ingest["publish_met"], bool)
    assert len(ingest["runs"]["bare_produce"]) == ingest["rounds"]

    train = data["training"]
    assert _numbers(train["avalanche_samples_per_s"], train["bare_samples_per_s"], train["ratio"])
    assert {"OnlineFisherEWC", "ReservoirReplay", "StatsPlugin", "CheckpointPlugin"} <= set(train["plugins"])
    assert train["checkpoint_saves"] >= 1

    fresh = data["freshness"]
    for view in ("visible", "sent", "in_process"):
        summary = fresh["event_to_vector"][view]
        assert summary["n"] > 0 and _numbers(summary["p50_s"], summary["p99_s"])
    assert _numbers(fresh["item_refresh"]["p99_s"]) and fresh["item_refresh"]["model_updates"] >= 1
    assert fresh["events_unserved"] == 0
    assert fresh["worker"]["totals"]["consumed"] == fresh["events_sent"]

    memory = data["memory"]
    assert len(memory["samples"]) >= 2 and _numbers(memory["growth"], memory["rss_end_mb"])

    (scale,) = data["scale"]
    assert scale["users"] == scale["items"] == 300
    assert _numbers(scale["ingest"]["ratio"], scale["freshness"]["event_to_vector"]["visible"]["p99_s"])
    assert _numbers(scale["rss_mb"], scale["rss_peak_mb"]) and scale["rss_mb"] > 100

    assert markdown_table(data).count("\n") >= 9
    assert "bare kafka-python consume->produce" in markdown_table(data)


def test_scales_name_users_and_items_apart_or_the_big_grid():
    assert parse_scales("300") == ((300, 300),)
    assert parse_scales("10000x1000, 5") == ((10_000, 1_000), (5, 5))
    assert parse_scales("grid") == SCALE_GRID and len(SCALE_GRID) == 9
    assert {users for users, _ in SCALE_GRID} == {10_000, 100_000, 1_000_000}
    assert {items for _, items in SCALE_GRID} == {1_000, 10_000, 100_000}
    with pytest.raises(ValueError, match="USERSxITEMS"):
        parse_scales("big")


def test_plan_scales_with_seconds():
    short, full = BenchOptions(seconds=5).plan(), BenchOptions().plan()
    assert full["steady_seconds"] == 600 and full["memory_sample_every_s"] == 10 and full["memory_warmup_s"] == 60
    assert short["ingest_events"] < full["ingest_events"] and short["rounds"] == 1 and full["rounds"] == 3


def test_round_robin_users_are_evenly_spaced():
    world = BenchWorld(n_users=50, n_items=40, text_items=10)
    events = list(world.events(0, 150))
    by_user: dict[str, list[int]] = {}
    for k, event in enumerate(events):
        by_user.setdefault(event.user_id, []).append(k)
    assert len(by_user) == 50 and all(b - a == 50 for ks in by_user.values() for a, b in zip(ks, ks[1:]))
    assert len(world.items()) == 10 and all(e.item_id.startswith("item-") for e in events)


def test_latency_histogram_quantiles_never_flatter():
    hist = LatencyHistogram(max_s=2.0)
    for ms in range(1, 101):
        hist.add(ms / 1000)
    hist.add(5.0)  # beyond the range: the overflow bucket reports the largest value
    assert hist.quantile(0.5) == pytest.approx(0.051)
    assert hist.quantile(1.0) == 5.0
    assert hist.summary()["n"] == 101


def test_bench_distributed_section_measures_one_process_and_two_ranks(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, [
        "bench", "--seconds", "5", "--device", "cpu", "--users", "200", "--items", "60",
        "--sections", "distributed", "--out", str(out)])
    assert result.exit_code == 0, result.output
    dist = json.loads(out.read_text())["distributed"]
    assert dist["one_rank"]["ranks"] == 1 and dist["two_ranks"]["ranks"] == 2
    # Every event after the warm-up experience trained once, split across the two ranks.
    assert dist["one_rank"]["events"] == dist["two_ranks"]["events"] == dist["experiences"] * dist["experience_size"]
    assert _numbers(dist["one_rank"]["events_per_s"], dist["two_ranks"]["events_per_s"], dist["speedup"])
    assert "compete" in dist["note"] or dist["cores"] >= 4
    assert "two gloo ranks vs one process" in markdown_table(json.loads(out.read_text()))
