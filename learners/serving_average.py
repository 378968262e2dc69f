"""Serve a running average of the item tower's weights, train the live ones.

After every optimizer step the plugin moves a shadow copy of chosen
parameters toward the live ones: ``shadow = decay * shadow + (1 - decay) *
live``. Published vectors are built with the shadow in place. The average
lags the live weights by about ``1 / (1 - decay)`` steps and smooths out what
the newest minibatches pushed hardest.

The learner averages the item side only (item id table, text projection):
items are what every user is ranked against, and their stability is what
holds forgetting (BWT) near zero on P1, while user vectors keep following
the newest events through the live user side. Averaging the user side too
held forgetting no better and cost more accuracy (README "Evaluation").

The encoder's trainable top layers are never averaged: the cached pooled
text features they produce are shared with training.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import nn


class ServingAverage(SupervisedPlugin):
    def __init__(self, model: nn.Module, decay: float, names: Optional[Iterable[str]] = None) -> None:
        """``names``: the parameters (or submodules, by top-level name) averaged; None: all but ``top``."""
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"serving average decay must lie in [0, 1), got {decay}")
        self.model = model
        self.decay = decay
        self.names = frozenset(names) if names is not None else None
        self.shadow: dict[str, torch.Tensor] = {}

    def _tracked(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.model.named_parameters():
            owner = name.split(".", 1)[0]
            if param.requires_grad and owner != "top" and (self.names is None or owner in self.names):
                yield name, param

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
        tracked = {name for name, _ in self._tracked()}  # an older checkpoint may average more
        self.shadow = {name: t.to(device).clone() for name, t in state.items() if name in tracked}
