"""The Avalanche strategy: a ``Naive`` template for recommender minibatches.

Every behaviour is a plugin on a named step of the loop: EWC (online, decayed
importances), experience replay (fixed-size reservoir) and training stats.
Strategy names follow CONTRACTS section 4.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from avalanche.models.dynamic_optimizers import update_optimizer
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
from avalanche.training.supervised import Naive

from learners.errors import ConfigError
from learners.ewc import OnlineFisherEWC
from learners.replay_buffer import CompactReservoirBuffer  # bounded memory: see its docstring

STRATEGIES = ("naive", "ewc", "replay", "ewc_replay", "joint")


class RecommenderTemplate(Naive):
    """Naive SGD loop whose minibatches are [history rows, history weights, item rows, task]."""

    def forward(self):
        return self.model(self.mbatch)

    def criterion(self):
        return self.model.loss(self.mb_output)

    def make_optimizer(self, reset_optimizer_state=False, remove_params=False, verbose_optimizer=False, **kwargs):
        """As Avalanche's, but only parameters that train go to the optimizer (a LoRA top
        holds frozen base weights, which would otherwise sit in its parameter groups)."""
        self.optimized_param_id = update_optimizer(
            self.optimizer, {n: p for n, p in self.model.named_parameters() if p.requires_grad},
            self.optimized_param_id, reset_state=reset_optimizer_state, remove_params=remove_params,
            verbose=verbose_optimizer)


@dataclass
class TrainingStats:
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    last_loss: float = float("nan")
    losses: list = field(default_factory=list)


class StatsPlugin(SupervisedPlugin):
    """Counts steps and samples (replayed ones included) and keeps the loss."""

    def __init__(self, stats: TrainingStats) -> None:
        super().__init__()
        self.stats = stats
        self._started = 0.0

    def before_training_exp(self, strategy, **kwargs):
        self._started = time.perf_counter()
        self.stats.losses = []

    def after_training_iteration(self, strategy, **kwargs):
        self.stats.steps += 1
        self.stats.samples += len(strategy.mbatch[0])
        loss = float(strategy.loss.detach())
        self.stats.last_loss = loss
        self.stats.losses.append(loss)

    def after_training_exp(self, strategy, **kwargs):
        self.stats.seconds += time.perf_counter() - self._started


@dataclass(frozen=True)
class StrategyParts:
    strategy: RecommenderTemplate
    stats: TrainingStats
    ewc: OnlineFisherEWC | None
    replay: ReplayPlugin | None


def build_strategy(kind: str, model: torch.nn.Module, *, lr: float, batch_size: int, epochs: int,
                   ewc_lambda: float, ewc_decay: float, replay_size: int, replay_batch: int,
                   device: torch.device, extra_plugins: tuple = ()) -> StrategyParts:
    if kind not in STRATEGIES:
        raise ConfigError(f"unknown strategy {kind!r}; choose one of {', '.join(STRATEGIES)}")
    stats = TrainingStats()
    plugins: list = [StatsPlugin(stats), *extra_plugins]
    ewc = replay = None
    if kind in ("ewc", "ewc_replay") and ewc_lambda > 0:
        ewc = OnlineFisherEWC(ewc_lambda, ewc_decay)
        plugins.append(ewc)
    if kind in ("replay", "ewc_replay") and replay_size > 0 and replay_batch > 0:
        replay = ReplayPlugin(mem_size=replay_size, batch_size=batch_size, batch_size_mem=replay_batch,
                              storage_policy=CompactReservoirBuffer(max_size=replay_size))
        plugins.append(replay)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    strategy = RecommenderTemplate(model=model, optimizer=optimizer, train_mb_size=batch_size,
                                   train_epochs=epochs, eval_mb_size=batch_size, device=device,
                                   plugins=plugins, evaluator=None)
    return StrategyParts(strategy, stats, ewc, replay)
