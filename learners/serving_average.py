"""Serve a running average of the tower's weights, train the live ones.

After every optimizer step the plugin moves a shadow copy of the two-tower's
own parameters (id tables, projections, global context) toward the live ones:
``shadow = decay * shadow + (1 - decay) * live``. Published vectors are built
from the shadow. The average lags the live model by about ``1 / (1 - decay)``
steps and smooths out what the newest minibatches pushed hardest: on P1 it
is what holds forgetting (BWT) at zero, at some cost in how fast vectors
follow the very newest events (README "Evaluation" has the figures).

The encoder's trainable top layers are not averaged: the cached pooled text
features they produce are shared with training.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import nn


class ServingAverage(SupervisedPlugin):
    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"serving average decay must lie in [0, 1), got {decay}")
        self.model = model
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}

    def _tracked(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("top."))

    @torch.no_grad()
    def after_training_iteration(self, strategy, **kwargs) -> None:
        for name, param in self._tracked():
            shadow = self.shadow.get(name)
            if shadow is None or shadow.shape[1:] != param.shape[1:]:
                self.shadow[name] = param.detach().clone()
                continue
            if len(shadow) < len(param):  # the id tables grew: new rows start at their live value
                shadow = torch.cat([shadow, param.detach()[len(shadow):]])
                self.shadow[name] = shadow
            shadow.lerp_(param.detach()[: len(shadow)], 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The model with the averaged weights in place (restored on exit)."""
        live: dict[str, torch.Tensor] = {}
        for name, param in self._tracked():
            shadow = self.shadow.get(name)
            if shadow is None or shadow.shape[1:] != param.shape[1:]:
                continue
            rows = min(len(shadow), len(param))
            live[name] = param.detach()[:rows].clone()
            param.detach()[:rows].copy_(shadow[:rows])
        try:
            yield
        finally:
            params = dict(self.model.named_parameters())
            for name, value in live.items():
                params[name].detach()[: len(value)].copy_(value)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu() for name, t in self.shadow.items()}

    def load_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.shadow = {name: t.to(device).clone() for name, t in state.items()}
