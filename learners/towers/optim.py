"""Adam that touches only the rows of an id table a step has gradient for.

The learned id tables (one row per catalogue item) dominate the parameter
count, but a minibatch only reaches a few hundred rows. Dense Adam reads and
writes every row of every table on every step, so a step would cost in
proportion to the catalogue, not the batch. Here parameters in a group with
``row_sparse=True`` are updated "lazily" (as TensorFlow's LazyAdam): only rows
whose gradient is non-zero get their moments and values updated; the other
rows stay exactly as they are (no momentum drift for items nobody touched).
The model looks its tables up with sparse gradients, so the rows a step
reached come with the gradient and no step scans a table. Other groups get
plain Adam. State keys match ``torch.optim.Adam`` so checkpoints map one
onto the other.
"""

from __future__ import annotations

import math

import torch


class RowSparseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, row_sparse: bool = False) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, row_sparse=row_sparse)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                state = self.state[param]
                if "exp_avg" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                elif state["exp_avg"].shape != param.shape:  # a table grew: moments of old rows stay
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = grown_rows(state[key], param)
                step = state["step"]
                step += 1
                t = float(step)
                correction1 = 1.0 - beta1 ** t
                correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if grad.is_sparse or (group["row_sparse"] and param.dim() == 2):
                    rows, g = gradient_rows(grad)
                    if len(rows) == 0:
                        continue
                    p = param.index_select(0, rows)
                    if decay:
                        g = g.add(p, alpha=decay)
                    m_rows = m.index_select(0, rows).mul_(beta1).add_(g, alpha=1.0 - beta1)
                    v_rows = v.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                    m.index_copy_(0, rows, m_rows)
                    v.index_copy_(0, rows, v_rows)
                    denom = (v_rows.sqrt() / correction2_sqrt).add_(eps)
                    param.index_copy_(0, rows, p.addcdiv_(m_rows, denom, value=-lr / correction1))
                else:
                    if decay:
                        grad = grad.add(param, alpha=decay)
                    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    denom = (v.sqrt() / correction2_sqrt).add_(eps)
                    param.addcdiv_(m, denom, value=-lr / correction1)
        return loss


def gradient_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, gradient rows) of an id table's gradient.

    Sparse gradients (``F.embedding(..., sparse=True)``) name their rows; a dense one
    is scanned for non-zero rows, which costs a pass over the whole table.
    """
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)


def grown_rows(old: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``old`` zero-padded to ``param``'s rows (state of a grown id table)."""
    out = torch.zeros_like(param)
    if old.dim() == param.dim() and old.shape[1:] == param.shape[1:] and old.shape[0] <= param.shape[0]:
        out[: old.shape[0]] = old
    return out


__all__ = ["RowSparseAdam", "gradient_rows", "grown_rows"]
