"""The results file (docs/formats.md), plus plots and Markdown tables.

``write_plot``, ``write_stability_plot`` and ``markdown_table`` take the results
dict (the JSON shape), so they work just as well on a results file loaded from disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from learners.evaluation.protocol import StrategyResult

PathLike = Union[str, Path]
# Slices written with their user count; the scenario's (retention, plasticity, novel) without.
COUNTED_SLICES = ("returning", "active")
SCENARIO_SLICES = ("retention", "plasticity", "novel")


def strategy_dict(result: StrategyResult) -> dict:
    recall_key, ndcg_key = f"recall@{result.k}", f"ndcg@{result.k}"
    slices = {}
    for name, score in result.slices.items():
        slices[name] = {ndcg_key: score.ndcg, recall_key: score.recall}
        if name in COUNTED_SLICES:
            slices[name]["users"] = score.users
    return {
        recall_key: result.recall,
        ndcg_key: result.ndcg,
        "bwt": result.bwt,
        "train_seconds": result.train_seconds,
        "samples_trained": result.samples_trained,
        "cold": {recall_key: result.cold_recall, ndcg_key: result.cold_ndcg},
        **slices,
        "per_block": [
            {"block": s.block, recall_key: s.recall, ndcg_key: s.ndcg, "users": s.users}
            for s in result.per_block
        ],
    }


def results_dict(*, blocks: int, k: int, events: int, items: int,
                 strategies: dict[str, StrategyResult], scenario: Optional[str] = None) -> dict:
    """The results object; ``items`` is the catalogue size (every candidate). ``scenario``,
    an optional field, names the event order when it is not the stream's own."""
    for name, result in strategies.items():
        if result.k != k:
            raise ValueError(f"strategy {name} was measured at K={result.k}, not K={k}")
    out = {"protocol": "P1", "blocks": blocks, "k": k, "events": events, "items": items}
    if scenario is not None:
        out["scenario"] = scenario
    out["strategies"] = {name: strategy_dict(r) for name, r in strategies.items()}
    return out


def _write_text(path: PathLike, text: str) -> Path:
    # tmp + rename: a reader never sees half a results file.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_results(path: PathLike, *, blocks: int, k: int, events: int, items: int,
                  strategies: dict[str, StrategyResult], scenario: Optional[str] = None) -> dict:
    """Write the results JSON and return the dict written."""
    results = results_dict(blocks=blocks, k=k, events=events, items=items, strategies=strategies,
                           scenario=scenario)
    _write_text(path, json.dumps(results, indent=2, allow_nan=False) + "\n")
    return results


def markdown_table(results: dict) -> str:
    k = results["k"]
    lines = [
        f"Protocol {results['protocol']}"
        + (f" ({results['scenario']} scenario)" if results.get("scenario") else "")
        + f": {results['blocks']} blocks, K={k}, "
        f"{results['events']} events, {results['items']} items.",
        "",
        f"| strategy | Recall@{k} | NDCG@{k} | BWT | P1-cold NDCG@{k} | train s | samples trained |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results["strategies"].items():
        bwt = "n/a" if s["bwt"] is None else f"{s['bwt']:+.4f}"
        cold = s.get("cold") or {}
        cold_ndcg = "n/a" if f"ndcg@{k}" not in cold else f"{cold[f'ndcg@{k}']:.4f}"
        lines.append(f"| {name} | {s[f'recall@{k}']:.4f} | {s[f'ndcg@{k}']:.4f} | {bwt} | {cold_ndcg} "
                     f"| {s['train_seconds']:.1f} | {s['samples_trained']} |")
    return "\n".join(lines + _slices_table(results)) + "\n"


def _slices_table(results: dict) -> list[str]:
    """Returning and active users, and the scenario's slices where measured: NDCG@K (users)."""
    k, strategies = results["k"], results["strategies"].items()
    columns = [name for name in COUNTED_SLICES + SCENARIO_SLICES if any(name in s for _, s in strategies)]
    if not columns:
        return []
    lines = ["", f"NDCG@{k} by slice (test users over its blocks):", "",
             "| strategy | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, s in strategies:
        cells = []
        for column in columns:
            part = s.get(column)
            cell = "n/a" if part is None else f"{part[f'ndcg@{k}']:.4f}"
            if part is not None and "users" in part:
                cell += f" ({part['users']})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: PathLike, results: dict) -> Path:
    return _write_text(path, markdown_table(results))


def write_plot(png_path: PathLike, results: dict) -> Path:
    """NDCG@K per block, one line per strategy."""
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = results["k"]
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, s in results["strategies"].items():
        blocks = [b["block"] for b in s["per_block"]]
        values = [b[f"ndcg@{k}"] for b in s["per_block"]]
        axes.plot(blocks, values, marker="o", label=f"{name} ({s[f'ndcg@{k}']:.3f})")
    axes.set_xlabel("block")
    axes.set_ylabel(f"NDCG@{k}")
    axes.set_title(f"Protocol {results['protocol']}: NDCG@{k} per block (test, then train)")
    axes.grid(True, alpha=0.3)
    if results["strategies"]:
        axes.legend(loc="best", fontsize="small")
    return _save(figure, png_path)


def stability_axes(results: dict) -> tuple[str, str]:
    """The slices a stability-plasticity plot sets against each other: (x, y) = (plasticity,
    retention) under the recurring scenario, else (P1, returning users)."""
    if any("retention" in s for s in results["strategies"].values()):
        return "plasticity", "retention"
    return "p1", "returning"


def write_stability_plot(png_path: PathLike, results: dict) -> Path:
    """One point per strategy: how well it keeps a taste it saw before (y) against how well it
    learns what is in front of it (x); NDCG@K both."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = results["k"]
    x_name, y_name = stability_axes(results)
    labels = {"p1": f"P1 NDCG@{k} (plasticity)", "plasticity": f"plasticity NDCG@{k}",
              "returning": f"returning users' NDCG@{k} (stability)", "retention": f"retention NDCG@{k}"}
    figure = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, s in results["strategies"].items():
        x = s if x_name == "p1" else s.get(x_name)
        y = s.get(y_name)
        if x is None or y is None:
            continue  # a strategy measured without the slice has no point
        axes.scatter([x[f"ndcg@{k}"]], [y[f"ndcg@{k}"]], s=36)
        axes.annotate(name, (x[f"ndcg@{k}"], y[f"ndcg@{k}"]), textcoords="offset points", xytext=(5, 4),
                      fontsize="small")
    axes.set_xlabel(labels[x_name])
    axes.set_ylabel(labels[y_name])
    axes.margins(0.2)  # room for the names beside the points
    axes.set_title("Stability against plasticity, one point per strategy")
    axes.grid(True, alpha=0.3)
    return _save(figure, png_path)


def stability_plot_path(out_path: PathLike) -> Path:
    """Where the stability-plasticity plot goes beside a results file."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + "-stability.png")


def _save(figure, png_path: PathLike) -> Path:
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path)
    return png_path
