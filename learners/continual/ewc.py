"""Online EWC whose importances come from the training gradients themselves.

Avalanche's ``EWCPlugin`` estimates importances with an extra forward and
backward pass over the whole experience after training on it, which costs
about a third of the training throughput in a stream. Here the squared
gradients of the task loss are accumulated while training (an empirical
Fisher over minibatches, as in EWC++), then folded into the online importances
with the usual decay. The penalty gradient is added analytically after
backward, so it stays out of the importance estimate and needs no autograd
graph. Only trainable parameters are tracked: memory grows with what is
trained, not with the model.

Id tables the model lists in ``row_sparse_params`` (trained by
``RowSparseAdam``, which moves only rows that have gradient) are handled row by
row: squared gradients are added for the rows a step reached (a sparse
gradient names them), and the penalty is computed over the rows that moved
since the anchor (all others sit exactly on it), so a step costs in
proportion to the batch, not to the catalogue.
"""

from __future__ import annotations

import torch
from avalanche.training.plugins import SupervisedPlugin

from learners.towers.optim import gradient_rows


class OnlineFisherEWC(SupervisedPlugin):
    """Online EWC (penalty ``ewc_lambda * sum(importance * (w - anchor)^2)``, importances decayed
    by ``decay_factor`` per experience) on the training gradients; Avalanche's own ``EWCPlugin``
    is the strategy ``avalanche_ewc_replay``."""

    def __init__(self, ewc_lambda: float, decay_factor: float) -> None:
        super().__init__()
        self.ewc_lambda = ewc_lambda
        self.decay_factor = decay_factor
        self._grad_sq: dict[str, torch.Tensor] = {}
        self._steps = 0
        self.anchor: dict[str, torch.Tensor] = {}
        self.importance: dict[str, torch.Tensor] = {}
        self._last_penalty: float | torch.Tensor = 0.0
        self._moved: dict[str, torch.Tensor] = {}  # row-sparse tables: rows off their anchor

    @staticmethod
    def _trainable(model):
        return ((name, p) for name, p in model.named_parameters() if p.requires_grad)

    def before_backward(self, strategy, **kwargs):
        """No autograd penalty: see ``after_backward``."""

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs):
        # Fused in-place ops, one temporary per parameter and one device sync per step: the
        # plain-expression version was a large share of a training step on CPU.
        penalty = None
        sparse = getattr(strategy.model, "row_sparse_params", ())
        for name, param in self._trainable(strategy.model):
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse or (name in sparse and grad.dim() == 2):
                term = self._row_sparse_step(name, param, grad)
                if term is not None:
                    penalty = term if penalty is None else penalty + term
                continue
            acc = self._grad_sq.get(name)
            if acc is None or acc.shape != grad.shape:
                acc = _expand(acc, grad.shape, param.device)
            self._grad_sq[name] = acc.addcmul_(grad, grad)  # += grad ** 2 (task loss only)
            if name in self.importance and self.ewc_lambda > 0:
                imp = self._fit(name, param)
                diff = param.detach() - self.anchor[name]
                grad.addcmul_(imp, diff, value=2.0 * self.ewc_lambda)  # d/dp of lambda * imp * diff^2
                term = torch.dot(imp.reshape(-1), diff.mul_(diff).reshape(-1))
                penalty = term if penalty is None else penalty + term
        self._steps += 1
        self._last_penalty = penalty if penalty is not None else 0.0

    @property
    def last_penalty(self) -> float:
        """lambda * sum(importance * (weights - anchor)^2) at the last step. Read when asked, not
        per step: a float() per step would make a GPU wait for every step to finish."""
        value = self._last_penalty
        if torch.is_tensor(value):
            value = self._last_penalty = self.ewc_lambda * float(value)
        return value

    @last_penalty.setter
    def last_penalty(self, value: float) -> None:
        self._last_penalty = float(value)

    def _row_sparse_step(self, name: str, param: torch.Tensor, grad: torch.Tensor):
        rows, g = gradient_rows(grad)
        acc = self._grad_sq.get(name)
        if acc is None or acc.shape != grad.shape:
            acc = self._grad_sq[name] = _expand(acc, grad.shape, param.device)
        acc.index_add_(0, rows, g * g)
        if name not in self.importance or self.ewc_lambda <= 0:
            return None
        imp = self._fit(name, param)
        anchor = self.anchor[name]
        moved = self._moved.get(name)
        if moved is None or moved.shape[0] != param.shape[0]:
            moved = (param.detach() != anchor).any(dim=1)  # once per experience (or after a restore)
        moved = self._moved[name] = moved.index_fill_(0, rows, True)
        idx = moved.nonzero().squeeze(1)
        diff = param.detach().index_select(0, idx) - anchor.index_select(0, idx)
        imp_rows = imp.index_select(0, idx)
        pull = imp_rows * diff * (2.0 * self.ewc_lambda)  # d/dp of lambda * imp * diff^2
        if grad.is_sparse:
            # The moved rows include the batch's: one coalesced gradient over them.
            position = moved.cumsum(0).sub_(1)
            pull.index_add_(0, position.index_select(0, rows), g)
            param.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), pull, param.shape, is_coalesced=True,
                                                 check_invariants=False)
        else:
            grad.index_add_(0, idx, pull)
        return torch.dot(imp_rows.reshape(-1), diff.mul_(diff).reshape(-1))

    @torch.no_grad()
    def fit(self, model) -> None:
        """Grow every importance and anchor to its parameter's shape now (a checkpoint saves
        id-table state only up to the catalogue size; a step would otherwise grow it)."""
        for name, param in self._trainable(model):
            if name in self.importance:
                self._fit(name, param)

    def _fit(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Importance and anchor grown to the parameter's current shape (new rows: no penalty)."""
        imp = self.importance[name]
        if imp.shape != param.shape:
            anchor = param.detach().clone()
            anchor[tuple(slice(0, s) for s in self.anchor[name].shape)] = self.anchor[name]
            self.importance[name] = _expand(imp, param.shape, param.device)
            self.anchor[name] = anchor
        return self.importance[name]

    @torch.no_grad()
    def after_training_exp(self, strategy, **kwargs):
        # In place where shapes allow: this runs after every experience (a fraction of a second
        # on a CPU), and fresh catalogue-sized tensors each time were a visible share of it.
        if self._steps == 0:
            return
        for name, param in self._trainable(strategy.model):
            acc = self._grad_sq.get(name)
            if acc is None:
                continue
            if acc.shape != param.shape:
                acc = self._grad_sq[name] = _expand(acc, param.shape, param.device)
            old = self.importance.get(name)
            if old is None:
                self.importance[name] = acc / self._steps
            else:
                if old.shape != param.shape:
                    old = _expand(old, param.shape, param.device)
                self.importance[name] = old.mul_(self.decay_factor).add_(acc, alpha=1.0 / self._steps)
            anchor = self.anchor.get(name)
            if anchor is not None and anchor.shape == param.shape:
                anchor.copy_(param.detach())
            else:
                self.anchor[name] = param.detach().clone()
            acc.zero_()
        for moved in self._moved.values():
            moved.zero_()  # every row sits on its new anchor
        self._steps = 0

    # -- checkpoints ------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.importance:
            out[f"importance/{name}"] = self.importance[name]
            out[f"anchor/{name}"] = self.anchor[name]
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self._moved.clear()
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            (self.importance if kind == "importance" else self.anchor)[name] = value

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.importance.values(), *self.anchor.values()))


def _expand(tensor, shape, device) -> torch.Tensor:
    """Zero-padded copy of ``tensor`` at ``shape`` (rows added to a growing table)."""
    out = torch.zeros(shape, device=device)
    if tensor is not None:
        out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


__all__ = ["OnlineFisherEWC"]
