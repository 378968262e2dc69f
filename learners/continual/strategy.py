"""The Avalanche strategy: a ``Naive`` template for recommender minibatches.

Every behaviour is a plugin on a named step of the loop: EWC (online, decayed
importances), experience replay (fixed-size reservoir) and training stats.
Strategy names follow CONTRACTS section 4.

Two things are done the cheap way because a sample here is three small
tensors, not an image: an experience's minibatches are sliced straight out of
its tensors (Avalanche's per-sample ``__getitem__`` and collate cost more than
the model step on a CPU), and the replay plugin mixes ``replay_batch``
replayed samples into every minibatch by indexing the reservoir's tensors
(``TensorReservoir``, an Avalanche storage policy that keeps its samples as
tensors updated in place).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from avalanche.training.plugins import SupervisedPlugin
from avalanche.training.supervised import Naive

from learners.errors import ConfigError
from learners.continual.ewc import OnlineFisherEWC
from learners.continual.experience import dataset_owners, dataset_tensors
from learners.towers.optim import RowSparseAdam
from learners.continual.replay_buffer import TensorReservoir

STRATEGIES = ("naive", "ewc", "replay", "ewc_replay", "avalanche_ewc_replay", "joint")


class TensorBatches:
    """Shuffled minibatches [history rows, weights, items, task labels] sliced from tensors."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool = True) -> None:
        self.tensors = tensors
        self.batch_size = max(1, int(batch_size))
        self.shuffle = shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[2]) / self.batch_size)

    def __iter__(self):
        n = len(self.tensors[2])
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield [t[idx] for t in self.tensors] + [torch.zeros(len(idx), dtype=torch.long)]


class RecommenderTemplate(Naive):
    """Naive SGD loop whose minibatches are [history rows, history weights, item rows, task]."""

    def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None, persistent_workers=False,
                              drop_last=False, **kwargs):
        self.experience_tensors = dataset_tensors(self.adapted_dataset)
        self.dataloader = TensorBatches(self.experience_tensors, self.train_mb_size, shuffle)

    def make_optimizer(self, reset_optimizer_state=False, **kwargs):
        """Point the optimizer's groups at the model's current parameters, by name.

        The id tables are replaced by larger ones as the catalogue grows; each keeps its
        group (learning rate, row-sparse updates) and its moments (``RowSparseAdam`` pads
        them for the new rows). Avalanche's own version infers groups from the module
        tree, which fails when siblings sit in different groups.
        """
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        previous = self.optimized_param_id or named
        name_of = {id(p): n for n, p in previous.items()}
        placed = set()
        for group in self.optimizer.param_groups:
            fresh = []
            for param in group["params"]:
                name = name_of.get(id(param))
                current = named.get(name, param) if name is not None else param
                if current is not param and param in self.optimizer.state:
                    self.optimizer.state[current] = self.optimizer.state.pop(param)
                fresh.append(current)
                placed.add(id(current))
            group["params"] = fresh
        missing = [p for p in named.values() if id(p) not in placed]
        if missing:  # a parameter the model gained: the last group (projections and the like)
            self.optimizer.param_groups[-1]["params"].extend(missing)
        if reset_optimizer_state:
            self.optimizer.state.clear()
        self.optimized_param_id = named

    def forward(self):
        return self.model(self.mbatch)

    def criterion(self):
        return self.model.loss(self.mb_output)


class ReservoirReplay(SupervisedPlugin):
    """Experience replay: ``batch_size_mem`` samples drawn from the reservoir join every
    minibatch (after the first experience); the experience's samples then enter the
    reservoir after it. Unlike Avalanche's ``ReplayPlugin`` (offered as the strategy
    ``avalanche_ewc_replay``) there is no replay data loader with a per-sample collate: the
    samples are indexed straight out of the reservoir's tensors.

    The draw leaves out the samples of users who are in the experience being trained: their
    own new events already train them, and replaying their older tastes would pull them back
    where they just moved on (drift). What replay keeps is the users who are away, the ones
    fine-tuning forgets and who come back to find the model gone elsewhere."""

    def __init__(self, mem_size: int, batch_size_mem: int, storage_policy: Optional[TensorReservoir] = None) -> None:
        super().__init__()
        self.mem_size = mem_size
        self.batch_size_mem = batch_size_mem
        self.storage_policy = storage_policy if storage_policy is not None else TensorReservoir(max_size=mem_size)
        self._away: Optional[torch.Tensor] = None  # reservoir places of users not in this experience
        # Share of ``batch_size_mem`` replayed, in [0, 1]: the learner lowers it while the stream moves on.
        self.strength = 1.0

    def before_training_exp(self, strategy, **kwargs):
        self._away = None
        present = dataset_owners(strategy.experience.dataset)
        if present is None or not self.storage_policy.filled:
            return
        owners = self.storage_policy.owners()
        away = torch.nonzero(~torch.isin(owners, present[present != 0])).squeeze(1)
        if 0 < len(away) < len(owners):
            self._away = away

    def before_training_iteration(self, strategy, **kwargs):
        size = round(self.batch_size_mem * self.strength)
        if not self.storage_policy.filled or size <= 0:
            return
        tensors = self.storage_policy.tensors()
        if self._away is not None:
            pick = self._away[torch.randint(0, len(self._away), (size,))]
        else:
            pick = torch.randint(0, len(tensors[2]), (size,))
        device = strategy.mbatch[0].device
        extra = [t[pick].to(device, a.dtype) for t, a in zip(tensors, strategy.mbatch)]
        extra.append(torch.zeros(len(pick), dtype=torch.long, device=device))
        strategy.mbatch = [torch.cat([a, b]) for a, b in zip(strategy.mbatch, extra)]

    def after_training_exp(self, strategy, **kwargs):
        self.storage_policy.post_adapt(strategy, strategy.experience)


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
        self._losses: list[torch.Tensor] = []

    def before_training_exp(self, strategy, **kwargs):
        self._started = time.perf_counter()
        self._losses = []

    def after_training_iteration(self, strategy, **kwargs):
        self.stats.steps += 1
        self.stats.samples += len(strategy.mbatch[0])
        # Kept on the device and read once per experience: a float() per step would make
        # a GPU wait for every step to finish before the next is queued.
        self._losses.append(strategy.loss.detach())

    def after_training_exp(self, strategy, **kwargs):
        losses = torch.stack(self._losses).float().tolist() if self._losses else []
        self._losses = []
        self.stats.losses = losses
        if losses:
            self.stats.last_loss = losses[-1]
        self.stats.seconds += time.perf_counter() - self._started


@dataclass(frozen=True)
class StrategyParts:
    strategy: RecommenderTemplate
    stats: TrainingStats
    ewc: OnlineFisherEWC | None
    replay: ReservoirReplay | None


def param_groups(model: torch.nn.Module, lr: float, id_lr_scale: float = 1.0,
                 text_lr_scale: float = 1.0) -> list[dict]:
    """Adam groups by parameter name: the encoder's trainable top (``top.``), the id
    tables (the model's ``row_sparse_params``, updated row by row) and everything else
    (projections, global context)."""
    sparse = set(getattr(model, "row_sparse_params", ()))
    groups: dict[str, list] = {"text": [], "ids": [], "rest": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "text" if name.startswith("top.") else "ids" if name in sparse else "rest"
        groups[kind].append(param)
    scale = {"text": text_lr_scale, "ids": id_lr_scale, "rest": 1.0}
    return [{"params": params, "lr": lr * scale[kind], "row_sparse": kind == "ids"}
            for kind, params in groups.items() if params]


def build_strategy(kind: str, model: torch.nn.Module, *, lr: float, batch_size: int, epochs: int,
                   ewc_lambda: float, ewc_decay: float, replay_size: int, replay_batch: int,
                   device: torch.device, extra_plugins: tuple = (), id_lr_scale: float = 1.0,
                   text_lr_scale: float = 1.0) -> StrategyParts:
    if kind not in STRATEGIES:
        raise ConfigError(f"unknown strategy {kind!r}; choose one of {', '.join(STRATEGIES)}")
    stats = TrainingStats()
    plugins: list = [StatsPlugin(stats), *extra_plugins]
    ewc = replay = None
    if kind in ("ewc", "ewc_replay") and ewc_lambda > 0:
        ewc = OnlineFisherEWC(ewc_lambda, ewc_decay)
        plugins.append(ewc)
    if kind in ("replay", "ewc_replay") and replay_size > 0 and replay_batch > 0:
        replay = ReservoirReplay(mem_size=replay_size, batch_size_mem=replay_batch)
        plugins.append(replay)
    if kind == "avalanche_ewc_replay":
        from learners.continual.avalanche_plugins import avalanche_ewc_replay  # a reference, not the product path

        plugins.extend(avalanche_ewc_replay(ewc_lambda, ewc_decay, replay_size, replay_batch))
    optimizer = RowSparseAdam(param_groups(model, lr, id_lr_scale, text_lr_scale), lr=lr)
    strategy = RecommenderTemplate(model=model, optimizer=optimizer, train_mb_size=batch_size,
                                   train_epochs=epochs, eval_mb_size=batch_size, device=device,
                                   plugins=plugins, evaluator=None)
    # Names of what the optimizer holds now: later calls map replaced (grown) tables by name.
    strategy.optimized_param_id = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return StrategyParts(strategy, stats, ewc, replay)
