"""``evaluate``: files in, protocol P1 for each strategy, results JSON + PNG + MD out.

The runner builds the peers (``popularity``, ``learners.evaluation.peers``) itself;
learner strategies come from the caller's ``factory`` so this package stays independent of how they are built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Union

from tqdm import tqdm

from learners.errors import ConfigError, RecstreamError
from learners.evaluation.files import read_events, read_items
from learners.evaluation.peers import PEERS
from learners.evaluation.popularity import PopularityRecommender
from learners.evaluation.protocol import Recommender, StrategyResult, prepare_p1, run_prepared
from learners.evaluation.report import (stability_plot_path, write_markdown, write_plot, write_results,
                                        write_stability_plot)
from learners.evaluation.scenarios import SCENARIOS, default_blocks, plan_scenario

log = logging.getLogger(__name__)

Factory = Callable[[str], Recommender]


def _build(name: str, factory: Optional[Factory]) -> Recommender:
    try:
        if factory is None:
            raise KeyError(name)
        return factory(name)
    except (KeyError, ValueError) as exc:
        if name == "popularity":
            return PopularityRecommender()
        if name in PEERS:
            return PEERS[name]()
        raise ConfigError(f"--strategies: cannot build strategy {name!r}: {exc}") from exc


def evaluate(events_path: Union[str, Path], items_path: Union[str, Path],
             out_path: Union[str, Path], blocks: Optional[int] = None, k: int = 10,
             strategies: Optional[list[str]] = None, factory: Optional[Factory] = None,
             show_progress: bool = True, scenario: str = "time") -> dict:
    """Run P1 for every strategy; write ``out_path``, its .png / .md siblings and the
    stability-plasticity plot (``stability_plot_path``).

    ``scenario`` (``learners.evaluation.scenarios``): ``time`` is the stream as it
    happened; ``genre-epochs`` replays it one genre group after another (drift);
    ``recurring`` plays three genre groups in three rounds and measures retention.
    ``blocks``: None takes the scenario's own (18 for ``recurring``, else 10).

    The JSON is rewritten after each strategy, so a long run that dies later
    still leaves the strategies already measured. Returns the results dict.
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"--scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}")
    blocks = default_blocks(scenario) if blocks is None else blocks
    if blocks < 2:
        raise ConfigError(f"--blocks must be at least 2, got {blocks}")
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    names = list(dict.fromkeys(s.strip() for s in (strategies or ["popularity"]) if s.strip()))
    if not names:
        raise ConfigError("--strategies names no strategy")
    events = read_events(events_path)
    items = read_items(items_path)
    if not events.records:
        raise RecstreamError(f"{events_path}: no valid events ({events.bad} bad line(s))")
    log.info("loaded %d events (%d bad) and %d items (%d bad)", len(events.records),
             events.bad, len(items.records), items.bad)

    try:
        plan = plan_scenario(scenario, events.records, items.records, blocks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    # Shared by all strategies:
    prepared = prepare_p1(plan.events, items.records, blocks, k, plan.block_sizes, plan.group_checks,
                          plan.block_sets)
    del events, items, plan
    out_path = Path(out_path)
    measured: dict[str, StrategyResult] = {}
    results: dict = {}
    for name in names:
        recommender = _build(name, factory)
        with tqdm(desc=name, unit="step", disable=not show_progress, leave=True) as bar:
            def progress(done: int, total: int, stage: str) -> None:
                bar.total = total
                bar.set_postfix_str(stage, refresh=False)
                bar.update(done - bar.n)

            measured[name] = run_prepared(recommender, prepared, progress)
        del recommender  # a model can be large: free it before building the next
        result = measured[name]
        log.info("%s: recall@%d=%.4f ndcg@%d=%.4f bwt=%s", name, k, result.recall, k,
                 result.ndcg, result.bwt)
        results = write_results(out_path, blocks=blocks, k=k, events=prepared.n_events,
                                items=len(prepared.catalogue), strategies=measured,
                                scenario=None if scenario == "time" else scenario)
    write_plot(out_path.with_suffix(".png"), results)
    write_stability_plot(stability_plot_path(out_path), results)
    write_markdown(out_path.with_suffix(".md"), results)
    return results
