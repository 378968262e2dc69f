"""Training: samples/s through the full Avalanche strategy next to a bare PyTorch loop.

``avalanche``: ``ContinualRecommender.learn()`` with the product's plugins --
online EWC, replay mixing (``replay_batch`` replayed samples in every
minibatch), the stats plugin that feeds the metrics, and a
``CheckpointPlugin`` saving every ``checkpoint_every`` experiences. The clock
runs from the strategy's first ``before_training`` hook to its last
``after_training`` hook, so every plugin is inside it: of a checkpoint save,
the part that holds training (the state to bytes, waiting for the previous
write); its disk half runs on the plugin's thread, beside whatever trains
next. ``learn_wall`` also counts the learner's own work around the strategy
(building the experience, re-embedding the trained items).

``bare``: the same ``TwoTower`` (its own copy, same catalogue, same events),
the very minibatches the strategy used (captured in round one, replayed
samples included), forward + ``TwoTower.loss`` + backward + ``SparseAdam``/``Adam`` steps;
no Avalanche, no plugins. Samples are counted the same way on both sides
(every row of every minibatch). On CUDA both run under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from avalanche.training.plugins import SupervisedPlugin

from stream.bench.common import BenchWorld, LearnerFactory, Progress, median, ratio, temp_state_dir
from stream.worker import heap

log = logging.getLogger(__name__)

TARGET = 0.8


class _Clock(SupervisedPlugin):
    """Timestamps one end of ``strategy.train`` (one instance first, one last in the plugin list)."""

    def __init__(self, hook: str, sync) -> None:
        super().__init__()
        self.times: list[float] = []
        self._sync = sync
        setattr(self, hook, self._stamp)

    def _stamp(self, strategy, **kwargs):
        self._sync()
        self.times.append(time.perf_counter())


class _Capture(SupervisedPlugin):
    """Copies the minibatches the strategy trains on (for the bare loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[torch.Tensor]] = []
        self.enabled = False

    def before_forward(self, strategy, **kwargs):
        if self.enabled:
            self.batches.append([t.detach().clone() for t in strategy.mbatch[:3]])


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync_for(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def run(factory: LearnerFactory, world: BenchWorld, *, experiences_per_round: int, rounds: int,
        checkpoint_every: int, progress: Progress) -> dict:
    from learners.continual.checkpoint_plugin import CheckpointPlugin

    items = world.items()
    learner = factory.make(items)
    bare_learner = factory.make(items)
    device = learner.device
    sync = _sync_for(device)
    exp_size = factory.settings.experience_size
    total = exp_size * (1 + rounds * experiences_per_round)
    for event in world.events(0, total, ts=lambda k: 1.7e9 + k, id_prefix="train"):
        learner.observe(event)
        bare_learner.observe(event)  # same catalogue rows and model size on both sides

    heap.freeze_startup_objects()  # as Worker.connect() does, for both sides
    strategy = learner.parts.strategy
    start, end, capture = _Clock("before_training", sync), _Clock("after_training", sync), _Capture()
    strategy.plugins.insert(0, start)
    strategy.plugins.append(capture)
    checkpoints = CheckpointPlugin.attach(learner, temp_state_dir("train"), every=checkpoint_every)
    strategy.plugins.append(end)  # after the checkpoint plugin: its saves are inside the clock
    stats = learner.parts.stats

    with _autocast(device):
        learner.learn(max_samples=exp_size)  # warm-up: first experience has no replay, no EWC yet
    progress(f"training: warm-up experience done ({len(strategy.plugins)} plugins: "
             f"{', '.join(type(p).__name__ for p in strategy.plugins)})")

    model = bare_learner.model
    bare_learner.features.ensure_rows(len(bare_learner.catalogue))
    model.grow(len(bare_learner.catalogue))
    model.to(device).train()
    # Plain PyTorch optimizers: SparseAdam for the id tables (their gradients are sparse), Adam for the rest.
    lr = bare_learner.config.learning_rate
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizers = [torch.optim.SparseAdam([p for n, p in trained if n in model.row_sparse_params], lr=lr),
                  torch.optim.Adam([p for n, p in trained if n not in model.row_sparse_params], lr=lr)]

    def bare_step(mbatch) -> None:
        with _autocast(device):
            loss = model.loss(model(mbatch))
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    # Side by side at the finest grain: each Avalanche experience is followed at once by the
    # same number of bare steps, so a neighbour's load spike hits both sides alike.
    runs = {"avalanche": [], "bare": [], "learn_wall": [], "ratio": [], "ratio_without_checkpoint_saves": []}
    shapes, batches = None, None
    for r in range(rounds):
        inside = wall = bare_time = 0.0
        saving0 = checkpoints.seconds
        samples = bare_samples = steps_total = 0
        for e in range(experiences_per_round):
            capture.enabled = batches is None
            samples0, steps0, n_times = stats.samples, stats.steps, len(start.times)
            t0 = time.perf_counter()
            with _autocast(device):
                learner.learn(max_samples=exp_size)
            sync()
            wall += time.perf_counter() - t0
            inside += sum(b - a for a, b in zip(start.times[n_times:], end.times[n_times:]))
            steps = stats.steps - steps0
            samples += stats.samples - samples0
            steps_total += steps
            if batches is None:
                capture.enabled = False
                batches = [[t.to(device) for t in b] for b in capture.batches]
                shapes = [list(t.shape) for t in batches[-1]]
                for mbatch in batches[:2]:
                    bare_step(mbatch)  # warm-up
            sync()
            t0 = time.perf_counter()
            for i in range(steps):
                mbatch = batches[(steps_total - steps + i) % len(batches)]
                bare_step(mbatch)
                bare_samples += len(mbatch[0])
            sync()
            bare_time += time.perf_counter() - t0
        runs["avalanche"].append(round(samples / inside, 2))
        runs["learn_wall"].append(round(samples / wall, 2))
        runs["bare"].append(round(bare_samples / bare_time, 2))
        runs["ratio"].append(ratio(runs["avalanche"][-1], runs["bare"][-1]))
        saving = checkpoints.seconds - saving0
        runs["ratio_without_checkpoint_saves"].append(ratio(samples / (inside - saving), runs["bare"][-1]))
        progress(f"training: round {r + 1}: avalanche {runs['avalanche'][-1]:.1f} samples/s "
                 f"(learn() wall {runs['learn_wall'][-1]:.1f}), bare {runs['bare'][-1]:.1f} samples/s, "
                 f"{steps_total} steps, ratio {runs['ratio'][-1]:.2f}")
    checkpoints.close()
    avalanche, bare, wall = (median(runs[k]) for k in ("avalanche", "bare", "learn_wall"))
    cfg = learner.config
    return {
        "device": str(device), "autocast": "bf16" if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size, "replay_batch": cfg.replay_batch, "minibatch_shapes": shapes,
        "negatives": cfg.negatives, "max_text_tokens": cfg.max_text_tokens, "train_layers": cfg.train_layers,
        "history_length": cfg.history_length, "experience_size": exp_size,
        "experiences_per_round": experiences_per_round, "rounds": rounds, "checkpoint_every": checkpoint_every,
        # checkpoint_seconds: what the saves held training up (their disk half runs beside it)
        "checkpoint_saves": checkpoints.saves, "checkpoint_seconds": round(checkpoints.seconds, 3),
        "plugins": [type(p).__name__ for p in strategy.plugins if not isinstance(p, (_Clock, _Capture))],
        "avalanche_samples_per_s": avalanche, "bare_samples_per_s": bare, "learn_wall_samples_per_s": wall,
        # Each round's ratio is side by side; the figure is their median (not a ratio of medians).
        "ratio": median(runs["ratio"]),
        "ratio_learn_wall": median([ratio(w, b) for w, b in zip(runs["learn_wall"], runs["bare"])]),
        "ratio_without_checkpoint_saves": median(runs["ratio_without_checkpoint_saves"]),
        "target_ratio": TARGET, "met": bool(median(runs["ratio"]) and median(runs["ratio"]) >= TARGET),
        "runs": runs,
    }
