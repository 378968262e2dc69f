"""Soak: does the worker's memory stay flat, and its freshness hold, over a long steady stream?

    python benchmarks/soak.py --minutes 30 --out soak

The bench's steady run (``recstream bench``'s freshness section: a production
worker in its own process, training on, checkpoints on, the synthetic stream
at ``--rate`` events/s, measured from outside) for ``--minutes``, sampled
every minute (every tenth of the run when shorter than ten minutes): the
worker's resident memory, the event -> user vector p99 of the events served
since the previous sample, and how full the bounded structures are (the replay
reservoir, the user histories, the de-duplication window). Prints the curve,
writes it as ``<out>.json`` and ``<out>.png``.

Memory that grows while a bounded structure is still filling is that
structure taking its pages (they are allocated zeroed and become resident
when first written); growth once every structure is full is a leak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream.bench.common import BenchWorld, Cluster, remove_state_dirs  # noqa: E402

MIB = 2 ** 20


def interval_quantile(before: Optional[np.ndarray], after: np.ndarray, q: float,
                      resolution_s: float = 1e-3) -> Optional[float]:
    """The ``q`` quantile of the latencies added between two snapshots of a ``LatencyHistogram``'s
    counts (upper bucket edge, as the histogram reports; the overflow bucket reads as its lower edge)."""
    counts = after if before is None else after - before
    n = int(counts.sum())
    if not n:
        return None
    idx = int(np.searchsorted(np.cumsum(counts), max(1, int(np.ceil(q * n)))))
    return round(min(idx + 1, len(counts) - 1) * resolution_s, 4)


class Curve:
    """One row a sample: minute, RSS, the interval's p99 and events served, the structures' fill."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._counts: Optional[np.ndarray] = None

    def sample(self, t_s: float, rss: Optional[int], matcher, sizes: Optional[dict]) -> None:
        counts = matcher.visible.counts.copy()  # the reader thread adds to it; one copy is enough
        previous, self._counts = self._counts, counts
        sizes = sizes or {}
        self.rows.append({
            "t_min": round(t_s / 60.0, 2),
            "rss_mb": None if rss is None else round(rss / MIB, 1),
            "served": int(counts.sum() - (0 if previous is None else previous.sum())),
            "event_p99_s": interval_quantile(previous, counts, 0.99),
            "replay_fill": _share(sizes.get("replay_samples"), sizes.get("replay_size")),
            "users": sizes.get("users"),
            "users_fill": _share(sizes.get("users"), sizes.get("max_users")),
            "dedup_fill": _share(sizes.get("dedup_ledger_ids"), sizes.get("dedup_window")),
            "model_version": sizes.get("model_version"),
        })
        print(format_row(self.rows[-1]), flush=True)


def _share(part, whole) -> Optional[float]:
    return round(part / whole, 4) if part is not None and whole else None


HEADER = "minute   RSS MiB   served   p99 (interval)   replay   users (fill)    dedup   version"


def format_row(row: dict) -> str:
    def pct(x):
        return "   n/a" if x is None else f"{x * 100:5.1f}%"

    p99 = "n/a" if row["event_p99_s"] is None else f"{row['event_p99_s'] * 1000:.0f} ms"
    rss = "n/a" if row["rss_mb"] is None else f"{row['rss_mb']:,.0f}"
    return (f"{row['t_min']:6.2f} {rss:>9} {row['served']:>8,} {p99:>16} {pct(row['replay_fill'])}  "
            f"{row['users'] or 0:>6,} ({pct(row['users_fill'])}) {pct(row['dedup_fill'])} {row['model_version']!s:>8}")


def plot(rows: list[dict], path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7.5))
    FigureCanvasAgg(fig)
    t = [r["t_min"] for r in rows]
    rss_ax, p99_ax, fill_ax = fig.subplots(3, 1, sharex=True)
    rss_ax.plot(t, [r["rss_mb"] for r in rows], marker="o")
    rss_ax.set_ylabel("worker RSS (MiB)")
    rss_ax.set_title(title, fontsize=9)
    p99_ax.plot(t, [None if r["event_p99_s"] is None else r["event_p99_s"] * 1000 for r in rows], marker="o",
                color="tab:red")
    p99_ax.set_ylabel("event -> vector\np99 (ms, interval)")
    for key, label in (("replay_fill", "replay reservoir"), ("users_fill", "user histories (of max users)"),
                       ("dedup_fill", "de-duplication window")):
        fill_ax.plot(t, [None if r[key] is None else r[key] * 100 for r in rows], marker=".", label=label)
    fill_ax.set_ylabel("fill (%)")
    fill_ax.set_xlabel("minutes")
    fill_ax.legend(fontsize=8)
    for ax in (rss_ax, p99_ax, fill_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(minutes: float, rate: float, users: int, items: int, max_text_items: int, device: str,
        every_s: Optional[float] = None) -> dict:
    from stream.bench import freshness
    from stream.config import Settings
    from stream.learner_setup import set_torch_threads

    seconds = minutes * 60.0
    every_s = every_s or (60.0 if minutes >= 10 else max(1.0, seconds / 10))
    base = Settings(device=device, metrics_port=0)
    set_torch_threads(base)
    world = BenchWorld(users, items, max_text_items)
    cluster = Cluster(None, base)
    curve = Curve()
    print(HEADER, flush=True)
    try:
        steady = freshness.run(cluster, world, seconds=seconds, rate=rate, linger_ms=base.producer_linger_ms,
                               sample_every_s=every_s, warmup_s=min(60.0, seconds / 10),
                               progress=lambda m: print(m, file=sys.stderr, flush=True), phase="soak",
                               on_sample=curve.sample)
    finally:
        cluster.close()
        remove_state_dirs()
    memory = steady.pop("memory")
    return {"minutes": minutes, "rate_events_per_s": rate, "users": users, "items": items,
            "sample_every_s": every_s, "curve": curve.rows,
            "memory": {k: memory.get(k) for k in ("rss_at_warmup_mb", "rss_end_mb", "rss_peak_mb", "growth",
                                                  "slope_mb_per_min", "growth_method")},
            "event_to_vector": steady["event_to_vector"]["visible"],
            "worker_sizes_at_end": steady["worker"]["sizes"], "events_sent": steady["events_sent"],
            "events_unserved": steady["events_unserved"], "finished": time.time()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--max-text-items", type=int, default=2_000)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--every-s", type=float, default=None,
                        help="seconds between samples (default: a minute, a tenth of runs under ten minutes)")
    parser.add_argument("--out", default="soak", help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    result = run(args.minutes, args.rate, args.users, args.items, args.max_text_items, args.device, args.every_s)
    with open(f"{args.out}.json", "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result["curve"], f"{args.out}.png",
         f"{args.minutes:g} min at {args.rate:,.0f} events/s, {args.users:,} users, {args.items:,} items")
    mem, fresh = result["memory"], result["event_to_vector"]
    growth = "n/a" if mem["growth"] is None else f"{mem['growth'] * 100:+.1f} %"
    print(f"RSS {mem['rss_at_warmup_mb']} -> {mem['rss_end_mb']} MiB after warm-up ({growth}, "
          f"{mem['slope_mb_per_min']} MiB/min); event -> vector p50 {fresh['p50_s']} s, p99 {fresh['p99_s']} s "
          f"over {fresh['n']:,} events; written to {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
