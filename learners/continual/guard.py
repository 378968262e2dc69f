"""Undoing one training experience: what it changed, kept so that it can be put back.

``UpdateUndo`` is an Avalanche plugin. ``begin`` (right before an experience
trains) copies the small parts whole: the dense parameters (projections,
user tower, the encoder's trainable top), their Adam moments, their EWC
importance and anchor, and the serving average's shadow (the average already
walks its whole shadow on every optimizer step, so one copy per experience
costs less than one step of it). The id tables are copied row by row: before
every optimizer step ``before_update`` saves the rows that step's gradient
names, the first time a row is named, with their Adam moments and EWC
importance. A step moves no other row (``RowSparseAdam``), so putting those
back restores the tables exactly, whatever the catalogue size.

Two parts of an id table's EWC state come back without a copy: the anchor,
which equals the weights between experiences (EWC sets it to them after every
experience), and the importance of rows the experience never reached, which
EWC only multiplied by its decay (divided back; exact up to float rounding).

The popularity counts, the item-item head, the replay reservoir and the
users' histories are not part of an update: they describe the events, which
stay applied whatever happens to the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from avalanche.training.plugins import SupervisedPlugin

from learners.towers.optim import gradient_rows


# Newest untrained events an update is judged on (per check; fewer when fewer are there).
CHECK_EVENTS = 256
# Fewer tested events than this: the two versions cannot be told apart, the update stands.
MIN_CHECK_EVENTS = 16
# How far below zero, in standard errors, the mean paired difference must lie: one-sided, about
# one unchanged update in 160 by chance, and a clean update usually ranks better, not the same.
NOISE_ERRORS = 2.5


@dataclass
class _Rows:
    """Saved rows of one id table: which rows, and their values before the experience."""

    seen: torch.Tensor  # bool per row: already saved
    rows: list = field(default_factory=list)
    values: dict = field(default_factory=dict)  # part -> list of saved row blocks

    def add(self, part: str, block: torch.Tensor) -> None:
        self.values.setdefault(part, []).append(block)

    def cat(self, part: str) -> Optional[torch.Tensor]:
        blocks = self.values.get(part)
        return torch.cat(blocks) if blocks else None


class UpdateUndo(SupervisedPlugin):
    def __init__(self, model: torch.nn.Module, optimizer_names, ewc=None, average=None) -> None:
        """``optimizer_names``: a callable giving the strategy's name -> parameter map (the objects
        the optimizer keys its state on); ``ewc``: ``OnlineFisherEWC``; ``average``: ``ServingAverage``."""
        super().__init__()
        self.model = model
        self.optimizer_names = optimizer_names
        self.ewc = ewc
        self.average = average
        self.sparse = tuple(getattr(model, "row_sparse_params", ()))
        self.active = False
        self._optimizer = None
        self._dense: dict[str, torch.Tensor] = {}
        self._moments: dict[str, Optional[dict]] = {}  # dense: whole state; id tables: the step only
        self._ewc: dict[str, tuple] = {}  # dense: (importance, anchor); id tables: None if absent
        self._shadow: Optional[dict[str, torch.Tensor]] = None
        self._rows: dict[str, _Rows] = {}

    # -- taking --------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, optimizer) -> None:
        """Right before an experience trains: what it may change, see the module docstring."""
        self._optimizer = optimizer
        held = self.optimizer_names()
        self._dense, self._moments, self._ewc, self._rows = {}, {}, {}, {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            state = optimizer.state.get(held.get(name, param))
            sparse = name in self.sparse
            if self.ewc is not None:  # None: EWC starts on it in this experience; (): kept by rows
                self._ewc[name] = None if name not in self.ewc.importance else () if sparse else \
                    (self.ewc.importance[name].clone(), self.ewc.anchor[name].clone())
            if sparse:
                self._rows[name] = _Rows(torch.zeros(len(param), dtype=torch.bool))
                self._moments[name] = {"step": state["step"].clone()} if state else None
                continue
            self._dense[name] = param.detach().clone()
            self._moments[name] = {k: v.clone() for k, v in state.items()} if state else None
        # Through its checkpoint form: whatever the average keeps besides its shadow comes back too.
        self._shadow = {k: v.clone() for k, v in self.average.state().items()} if self.average else None
        self.active = True

    @torch.no_grad()
    def before_update(self, strategy, **kwargs) -> None:
        """Before an optimizer step: save the id-table rows it is about to move, once each."""
        if not self.active:
            return
        params = dict(self.model.named_parameters())
        for name, saved in self._rows.items():
            param = params[name]
            if param.grad is None:
                continue
            rows, _ = gradient_rows(param.grad)
            rows = rows[~saved.seen[rows]]
            if not len(rows):
                continue
            saved.seen[rows] = True
            saved.rows.append(rows)
            saved.add("weights", param.detach().index_select(0, rows))
            state = self._optimizer.state.get(param) if self._optimizer is not None else None
            for key in ("exp_avg", "exp_avg_sq"):
                saved.add(key, _rows_or_zero(state.get(key) if state else None, rows, param))
            if self.ewc is not None and name in self.ewc.importance:
                saved.add("importance", _rows_or_zero(self.ewc.importance[name], rows, param))

    # -- putting back ---------------------------------------------------------------
    @torch.no_grad()
    def undo(self, ewc_folded: bool) -> None:
        """Put back everything ``begin`` and ``before_update`` kept. ``ewc_folded``: the experience
        made at least one step, so EWC folded its importances (and moved its anchors)."""
        if not self.active:
            return
        params = dict(self.model.named_parameters())
        held = self.optimizer_names()
        state_of = self._optimizer.state
        for name, value in self._dense.items():
            params[name].detach().copy_(value)
        for name, saved in self._rows.items():
            param = params[name]
            rows = torch.cat(saved.rows) if saved.rows else torch.zeros(0, dtype=torch.long)
            if len(rows):
                param.detach().index_copy_(0, rows, saved.cat("weights"))
        for name, moments in self._moments.items():
            key = held.get(name, params[name])
            if moments is None:
                state_of.pop(key, None)
            elif name in self._rows:
                self._undo_row_moments(state_of[key], moments, self._rows[name])
            else:
                state_of[key] = moments
        if self.ewc is not None:
            self._undo_ewc(params, ewc_folded)
        if self._shadow is not None:
            self.average.load_state(self._shadow, next(self.model.parameters()).device)
        self.active = False

    def _undo_row_moments(self, state: dict, moments: dict, saved: _Rows) -> None:
        state["step"] = moments["step"]
        if not saved.rows:
            return
        rows = torch.cat(saved.rows)
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_copy_(0, rows, saved.cat(key))

    def _undo_ewc(self, params: dict, folded: bool) -> None:
        ewc = self.ewc
        for name in list(ewc.importance):
            if name not in self._ewc:
                continue  # not trainable any more: untouched
            before = self._ewc[name]
            if before is None:  # first experience with EWC on this parameter
                ewc.importance.pop(name, None)
                ewc.anchor.pop(name, None)
            elif name in self._rows:
                saved = self._rows[name]
                if folded:
                    ewc.importance[name].div_(ewc.decay_factor)
                if saved.rows:
                    ewc.importance[name].index_copy_(0, torch.cat(saved.rows), saved.cat("importance"))
                anchor = ewc.anchor[name]
                anchor.copy_(params[name].detach()[: len(anchor)])
            else:
                ewc.importance[name], ewc.anchor[name] = before

    def discard(self) -> None:
        """The update stands: drop what was kept."""
        self.active = False
        self._dense, self._moments, self._ewc, self._rows, self._shadow = {}, {}, {}, {}, None


def _rows_or_zero(table: Optional[torch.Tensor], rows: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``table[rows]``, zero for rows past its end (a table the step will grow) or with no table."""
    out = torch.zeros((len(rows),) + tuple(param.shape[1:]), dtype=param.dtype, device=param.device)
    if table is None:
        return out
    inside = rows < len(table)
    out[inside] = table.index_select(0, rows[inside]).to(out.dtype)
    return out


@dataclass
class UpdateCheck:
    """An update not yet judged: the version it made, the tables of the version it replaced
    (item table, user tower tables, user tower), and what its re-embedding pass covered."""

    version: int
    served: tuple
    refresh_cursor: int
    text_trained: list
    touched: object
    ewc_folded: bool


def model_items(published: np.ndarray, model_dim: int) -> np.ndarray:
    """The model's own item vectors inside published ones (learners/statistics/trending.py scales each item's
    model part by sqrt(1 - q^2), q its last coordinate; the item-item head scales all alike)."""
    q = np.clip(published[:, -1:], -0.999, 0.999)
    return published[:, :model_dim] / np.sqrt(1.0 - q * q)


def update_is_worse(before: np.ndarray, after: np.ndarray, tolerance: float) -> bool:
    """Per check event, the score under the replaced version (``before``) and the update (``after``):
    the update's mean is lower by more than ``tolerance`` of the replaced version's, and by more
    than noise (the mean paired difference lies over ``NOISE_ERRORS`` standard errors below zero).
    Young models swing by more than a tenth on a few dozen events both ways."""
    if len(before) < 2 or after.mean() >= before.mean() * (1.0 - tolerance):
        return False
    diff = after - before
    return bool(diff.mean() + NOISE_ERRORS * diff.std(ddof=1) / np.sqrt(len(diff)) < 0)
