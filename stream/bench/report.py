"""The bench results as Markdown tables (what docs/performance.md shows)."""

from __future__ import annotations

from typing import Optional


def _num(value: Optional[float], digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _s(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _ok(flag) -> str:
    return "n/a" if flag is None else ("yes" if flag else "**no**")


def _bound_note(fresh: dict) -> str:
    """The outside match is exact only while latency stays below one user's event spacing."""
    p99, exact = fresh["event_to_vector"]["visible"]["p99_s"], fresh.get("match_exact_below_s")
    return f" (a lower bound: exact below {exact:g} s)" if p99 is not None and exact and p99 > exact else ""


def _reported_row(figure: str, recstream: str, reference: str, ratio: str) -> str:
    """A figure shown for context: it has no target, so nothing is met or missed."""
    return f"| {figure} | {recstream} | {reference} | {ratio} | (reported) | |"


def markdown_table(results: dict) -> str:
    rows = ["| figure | recstream | reference (same run) | ratio / value | target | met |",
            "|---|---|---|---|---|---|"]
    ingest = results.get("ingest")
    if ingest:
        rows.append(f"| ingest, events/s (consume, validate, de-duplicate, apply; training paused; "
                    f"ratio = median of {ingest['rounds']} side-by-side rounds) "
                    f"| {_num(ingest['worker_events_per_s'])} | {_num(ingest['bare_events_per_s'])} "
                    f"(bare kafka-python + json.loads) | {_num(ingest['ratio'], 2)} | >= {ingest['target_ratio']} "
                    f"| {_ok(ingest['met'])} |")
        rows.append(_reported_row("ingest incl. publishing each touched user's vector, events/s",
                                  _num(ingest["worker_publish_events_per_s"]), _num(ingest["bare_events_per_s"]),
                                  _num(ingest["ratio_with_publish"], 2)))
        if ingest.get("publish_ratio") is not None:
            rows.append(f"| ingest incl. publishing, events/s, against a bare consume->produce loop (poll, "
                        f"json.loads, one record of the same shape per touched user and window, same producer) "
                        f"| {_num(ingest['worker_publish_events_per_s'])} "
                        f"| {_num(ingest['bare_produce_events_per_s'])} (bare kafka-python consume->produce) "
                        f"| {_num(ingest['publish_ratio'], 2)} | >= {ingest['publish_target_ratio']} "
                        f"| {_ok(ingest['publish_met'])} |")
    train = results.get("training")
    if train:
        rows.append(f"| training, samples/s (Avalanche: {', '.join(train['plugins'])}; {train['device']}"
                    f"{', bf16' if train.get('autocast') else ''}) | {_num(train['avalanche_samples_per_s'], 1)} "
                    f"| {_num(train['bare_samples_per_s'], 1)} (bare PyTorch loop, same model and batches) "
                    f"| {_num(train['ratio'], 2)} | >= {train['target_ratio']} | {_ok(train['met'])} |")
        if train.get("ratio_without_checkpoint_saves") is not None:
            rows.append(f"| training without the checkpoint saves (every {train['checkpoint_every']} experiences), "
                        f"samples/s | | | {_num(train['ratio_without_checkpoint_saves'], 2)} | (reported) | |")
        rows.append(_reported_row("training incl. the learner's re-embedding after each experience, samples/s",
                                  _num(train["learn_wall_samples_per_s"], 1), _num(train["bare_samples_per_s"], 1),
                                  _num(train["ratio_learn_wall"], 2)))
    dist = results.get("distributed")
    if dist:
        rows.append(_reported_row(
            f"training, stream events/s: two gloo ranks vs one process ({dist['experiences']} experiences of "
            f"{dist['experience_size']}; {dist['note']})", _num(dist["two_ranks"]["events_per_s"], 1),
            f"{_num(dist['one_rank']['events_per_s'], 1)} (one process)", _num(dist["speedup"], 2)))
        rows.append(_reported_row("two gloo ranks: share of their wall time in collectives (waits for the other "
                                  "rank included)", _num(dist["two_ranks"]["collective_share"], 3), "", ""))
    fresh = results.get("freshness")
    if fresh:
        vis, inproc = fresh["event_to_vector"]["visible"], fresh["event_to_vector"]["in_process"]
        bound = _bound_note(fresh)
        rows.append(f"| event produced -> user vector visible{bound}, p50 / p99 ({fresh['rate_events_per_s']:.0f} events/s, "
                    f"training on) | {_s(vis['p50_s'])} / {_s(vis['p99_s'])} | {_s(inproc['p50_s'])} / "
                    f"{_s(inproc['p99_s'])} (worker's own histogram) | n = {vis['n']:,} "
                    f"| p99 <= {fresh['targets']['event_p99_s']:.0f} s | {_ok(fresh['met']['event_p99'])} |")
        item = fresh["item_refresh"]
        rows.append(f"| model update -> item vectors visible, p50 / p99 | {_s(item['p50_s'])} / {_s(item['p99_s'])} "
                    f"| | {item['model_updates']} updates, {item['n']:,} item records "
                    f"| p99 <= {fresh['targets']['item_p99_s']:.0f} s | {_ok(fresh['met']['item_p99'])} |")
    mem = results.get("memory")
    if mem and mem.get("growth") is not None:
        rows.append(f"| worker RSS growth after warm-up ({mem['warmup_s']:.0f} s), sampled every "
                    f"{mem['sample_every_s']:.0f} s, medians of {mem.get('window_s', 0):.0f} s windows | {_num(mem['rss_at_warmup_mb'])} -> {_num(mem['rss_end_mb'])} MiB "
                    f"| peak {_num(mem['rss_peak_mb'])} MiB | {mem['growth'] * 100:+.1f} % "
                    f"| <= {mem['target_growth'] * 100:.0f} % | {_ok(mem['met'])} |")
    out = "\n".join(rows)
    scale = results.get("scale")
    if scale:
        lines = ["| users / items (with text) | ingest events/s: worker / bare (ratio) | incl. publishing (ratio) "
                 "| event -> user vector p50 / p99 | update -> item vectors p50 / p99 | worker RSS end |",
                 "|---|---|---|---|---|---|"]
        for row in scale:
            ing, fr = row["ingest"], row["freshness"]
            vis, item = fr["event_to_vector"]["visible"], fr["item_refresh"]
            rss = row.get("rss_mb", fr.get("memory", {}).get("rss_end_mb"))
            lines.append(f"| {row['users']:,} / {row['items']:,} ({row['item_texts']:,}) "
                         f"| {_num(ing['worker_events_per_s'])} / "
                         f"{_num(ing['bare_events_per_s'])} ({_num(ing['ratio'], 2)}) "
                         f"| {_num(ing['worker_publish_events_per_s'])} ({_num(ing['ratio_with_publish'], 2)}) "
                         f"| {_s(vis['p50_s'])} / {_s(vis['p99_s'])} | {_s(item['p50_s'])} / {_s(item['p99_s'])} "
                         f"| {_num(rss)} MiB |")
        out += "\n\n" + "\n".join(lines)
    return out
