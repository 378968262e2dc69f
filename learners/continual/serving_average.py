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

How much of the average is published is chosen on the stream (``choose``):
before an update trains on its events, the live item side, the average and
halfway between them each rank those events, and the share that ranked the
newest events best (decayed evidence) is published. Where tastes hold, the
average's smoothing pays; where they move on, its lag costs, and the live
weights take over.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
import numpy as np
from avalanche.training.plugins import SupervisedPlugin
from torch import nn


SHARES = (0.0, 0.5, 1.0)  # the average's share in the published item side: live, halfway, averaged
EVIDENCE_MEMORY = 0.7  # each update's ranking evidence decays by this per update
_CHOICE_KEY = "choice.share_evidence"  # [share, evidence...] beside the shadow tensors (not a parameter name)


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
        # What is published: this share of the way from the live weights to the average (``choose``).
        self.share = 1.0
        self.evidence = np.zeros(len(SHARES))

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
    def applied(self, share: Optional[float] = None) -> Iterator[None]:
        """The model with the published weights in place (restored on exit): the average's
        ``share`` (default: the one chosen on the stream, ``choose``) of the way from the live
        weights to the averaged ones."""
        share = self.share if share is None else share
        live: dict[str, torch.Tensor] = {}
        for name, param in self._tracked():
            shadow = self.shadow.get(name)
            if shadow is None or shadow.shape[1:] != param.shape[1:] or share <= 0.0:
                continue
            rows = min(len(shadow), len(param))
            live[name] = param.detach()[:rows].clone()
            param.detach()[:rows].lerp_(shadow[:rows], share)
        try:
            yield
        finally:
            params = dict(self.model.named_parameters())
            for name, value in live.items():
                params[name].detach()[: len(value)].copy_(value)

    def choose(self, gains: np.ndarray) -> float:
        """Add each of ``SHARES``' NDCG@10 on the newest events (ranked before they train
        anything) to its decayed evidence and publish with the best share so far: a stream
        whose tastes hold keeps the smoothed average, one that moves on follows the live weights."""
        self.evidence = self.evidence * EVIDENCE_MEMORY + np.asarray(gains, np.float64)
        self.share = float(SHARES[int(np.argmax(self.evidence))])
        return self.share

    def state(self) -> dict[str, torch.Tensor]:
        out = {name: t.detach().cpu() for name, t in self.shadow.items()}
        out[_CHOICE_KEY] = torch.from_numpy(np.concatenate([[self.share], self.evidence]))
        return out

    def load_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        tracked = {name for name, _ in self._tracked()}  # an older checkpoint may average more
        self.shadow = {name: t.to(device).clone() for name, t in state.items() if name in tracked}
        choice = state.get(_CHOICE_KEY)
        if choice is not None and len(choice) == 1 + len(SHARES):  # else: chosen afresh from the stream
            values = choice.double().numpy()
            self.share, self.evidence = float(values[0]), values[1:].copy()
