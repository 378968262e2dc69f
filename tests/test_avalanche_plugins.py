"""The product's EWC against Avalanche's formula, and Avalanche's own plugins as a strategy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from avalanche.training.plugins import EWCPlugin, ReplayPlugin
from avalanche.training.utils import ParamData
from torch import nn

from learners.continual.avalanche_plugins import AvalancheOnlineEWC, avalanche_ewc_replay
from learners.continual.ewc import OnlineFisherEWC
from learners.continual.strategy import ReservoirReplay


class _Tiny(nn.Module):
    row_sparse_params = ("emb",)

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(6, 3))
        self.lin = nn.Linear(3, 2)
        self.sparse = sparse

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        return self.lin(F.embedding(rows, self.emb, sparse=self.sparse)).pow(2).sum()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-grad", "sparse-grad"])
def test_product_ewc_penalty_and_gradient_equal_avalanches_on_the_same_importances(sparse):
    torch.manual_seed(0)
    model = _Tiny(sparse)
    lam = 7.0
    importance = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    anchor = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in model.named_parameters()}

    ours = OnlineFisherEWC(ewc_lambda=lam, decay_factor=0.5)
    ours.load_state({**{f"importance/{n}": t.clone() for n, t in importance.items()},
                     **{f"anchor/{n}": t.clone() for n, t in anchor.items()}})
    model.zero_grad()
    (0.0 * model.loss(torch.tensor([0, 2]))).backward()  # gradients exist, the task adds nothing
    ours.after_backward(SimpleNamespace(model=model))
    our_grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in model.named_parameters()}

    theirs = EWCPlugin(lam, mode="online", decay_factor=0.5)
    theirs.importances[0] = {n: ParamData(f"imp_{n}", init_tensor=t.clone()) for n, t in importance.items()}
    theirs.saved_params[0] = {n: ParamData(n, init_tensor=t.clone()) for n, t in anchor.items()}
    strategy = SimpleNamespace(model=model, device="cpu", loss=torch.zeros(()),
                               clock=SimpleNamespace(train_exp_counter=1))
    theirs.before_backward(strategy)
    their_grads = torch.autograd.grad(strategy.loss, list(model.parameters()))

    assert ours.last_penalty == pytest.approx(float(strategy.loss.detach()), rel=1e-5)
    for (name, _), grad in zip(model.named_parameters(), their_grads):
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_products_plugins_are_not_avalanches():
    # Their own names and bases: no reader takes them for Avalanche's plugins.
    assert not issubclass(OnlineFisherEWC, EWCPlugin)
    assert not issubclass(ReservoirReplay, ReplayPlugin)


def test_the_reference_strategy_is_avalanches_online_ewc_and_replay():
    ewc, replay = avalanche_ewc_replay(ewc_lambda=50.0, ewc_decay=0.9, replay_size=100, replay_batch=8)
    assert isinstance(ewc, AvalancheOnlineEWC) and isinstance(ewc, EWCPlugin)
    assert (ewc.mode, ewc.decay_factor, ewc.ewc_lambda) == ("online", 0.9, 50.0)
    assert type(replay) is ReplayPlugin and replay.mem_size == 100
    assert avalanche_ewc_replay(0.0, 0.9, 0, 8) == []
