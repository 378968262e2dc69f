"""Avalanche's own EWC and replay, as the reference strategy ``avalanche_ewc_replay``.

The product's plugins (``learners.continual.ewc.OnlineFisherEWC``, ``learners.continual.strategy.ReservoirReplay``)
do the same jobs the cheap way for a stream. This strategy runs Avalanche's
``EWCPlugin(mode="online")`` and ``ReplayPlugin`` as they are, so an evaluation
shows the two side by side on the same data: ranking, forgetting, samples/s.

One adaptation, and only where Avalanche's code cannot read this model: its
importance pass calls ``model(x)`` and ``criterion(out, y)`` on ``(x, y)``
samples, while a sample here is [history rows, weights, item] and the model
scores it with its own loss. ``AvalancheOnlineEWC`` overrides that pass alone
(the same squared gradients, averaged over the experience's minibatches);
penalty, importance decay and anchors are Avalanche's.
"""

from __future__ import annotations

import math
import warnings

import torch
from avalanche.training.plugins import EWCPlugin, ReplayPlugin
from avalanche.training.utils import zerolike_params_dict

from learners.continual.experience import dataset_tensors


# Avalanche 0.6's ReplayPlugin calls its buffer's deprecated ``update`` after every experience.
warnings.filterwarnings("ignore", message="Call to deprecated function update", category=DeprecationWarning)


class AvalancheOnlineEWC(EWCPlugin):
    def __init__(self, ewc_lambda: float, decay_factor: float) -> None:
        super().__init__(ewc_lambda, mode="online", decay_factor=decay_factor)

    def compute_importances(self, model, criterion, optimizer, dataset, device, batch_size, num_workers=0):
        model.eval()
        importances = zerolike_params_dict(model)
        tensors = dataset_tensors(dataset)
        n = len(tensors[2])
        batches = max(1, math.ceil(n / batch_size))
        for start in range(0, n, batch_size):
            mbatch = [t[start:start + batch_size].to(device) for t in tensors]
            optimizer.zero_grad()
            model.loss(model(mbatch)).backward()
            for (name, param), (same, imp) in zip(model.named_parameters(), importances.items()):
                assert name == same
                if param.grad is not None:
                    grad = param.grad.coalesce().to_dense() if param.grad.is_sparse else param.grad
                    imp.data += grad.pow(2)
        for imp in importances.values():
            imp.data /= float(batches)
        model.train()
        return importances


def avalanche_ewc_replay(ewc_lambda: float, ewc_decay: float, replay_size: int,
                         replay_batch: int) -> list:
    """Avalanche's online EWC and its replay (experience-balanced buffer, replay data loader)."""
    plugins: list = []
    if ewc_lambda > 0:
        plugins.append(AvalancheOnlineEWC(ewc_lambda, ewc_decay))
    if replay_size > 0 and replay_batch > 0:
        plugins.append(ReplayPlugin(mem_size=replay_size, batch_size_mem=replay_batch))
    return plugins


__all__ = ["AvalancheOnlineEWC", "avalanche_ewc_replay"]
