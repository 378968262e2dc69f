"""User towers: a user's recent items (context vectors) -> the user's side of the dot product.

Both towers read a history given newest first (position 0 = the latest event,
``learners.state.users.UserHistories.histories``), with weights > 0 on real events
and 0 on empty places, and work in two steps so that publishing stays cheap:
``tables`` turns context vectors of catalogue rows into per-item tables once
per model update, ``read`` then costs a few gathers per user.

``AttentionTower`` is SASRec's causal self-attention (Kang & McAuley 2018),
one block read out at the newest position: the newest item asks (query), every
item the user saw up to then answers (keys, values). Positions enter as
learned key and value offsets per age and a learned attention bias per age
and head, and the event weight (type, recency) as a learned log-weight term,
so how fast a user's past fades is learned, counted in that user's own
events, not fixed in wall time or stream events. A learned "null" slot is
always there to attend to: a user with no history yet gets a vector too.
Keys, values and queries are linear in the (layer-normalised) context vector
of one item, so they are per-item tables; the block's output at position i
depends on positions i and older only (``every_position`` shows it).

``SumTower`` is the earlier tower: a learned global part plus the weighted sum
of the history's context vectors.

Each tower returns, per user, the learned part (``dim``), one logit ``g`` for
the user's share of popularity and ``rungs`` raw weights of the popularity
rungs (``learners.statistics.popularity``); ``learners.towers.model`` turns them into a unit vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_MIN_LOG_WEIGHT = -30.0


def _popularity_start(rungs: int, share: float) -> torch.Tensor:
    """Initial [g, rung weights]: popularity share ``share`` spread evenly over the rungs."""
    share = min(max(share, 1e-3), 1 - 1e-3)
    return torch.cat([torch.tensor([math.log(share / (1 - share))]), torch.ones(rungs)])


class SumTower(nn.Module):
    def __init__(self, dim: int, rungs: int, popularity_share: float) -> None:
        super().__init__()
        self.dim, self.rungs = dim, rungs
        self.ctx_dim = dim
        # Unit-scale start: a zero sum would put cold users at normalise(0), whose gradient explodes.
        self.global_ctx = nn.Parameter(torch.randn(dim) / dim ** 0.5)
        self.popularity = nn.Parameter(_popularity_start(rungs, popularity_share)) if rungs else None

    def tables(self, ctx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ctx": ctx}

    def read(self, tables: dict[str, torch.Tensor], rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx = tables["ctx"]
        if rows.shape[1] == 0 or not len(ctx):
            summed = self.global_ctx.expand(len(rows), -1)
        else:
            summed = self.global_ctx + F.embedding_bag(rows, ctx, mode="sum", per_sample_weights=weights)
        if self.popularity is None:
            return summed
        return torch.cat([summed, self.popularity.expand(len(rows), -1)], dim=-1)


class AttentionTower(nn.Module):
    def __init__(self, dim: int, rungs: int, popularity_share: float, history_length: int, heads: int = 2) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError("attention heads must be at least 1")
        self.dim, self.rungs, self.heads = dim, rungs, heads
        self.ctx_dim = d = heads * max(1, dim // heads)
        self.length = history_length
        self.norm_in = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.pos_k = nn.Parameter(torch.zeros(history_length, d))
        self.pos_v = nn.Parameter(torch.zeros(history_length, d))
        self.pos_bias = nn.Parameter(torch.zeros(heads, history_length))
        # Attention starts as the weighted average the sum tower takes (logits = log weights).
        self.weight_scale = nn.Parameter(torch.ones(heads))
        self.null_k = nn.Parameter(torch.zeros(d))
        self.null_v = nn.Parameter(torch.zeros(d))
        self.null_bias = nn.Parameter(torch.full((heads,), -8.0))  # used only while nothing else is there
        self.out = nn.Linear(d, d)
        self.norm_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, dim + (1 + rungs if rungs else 0))
        if rungs:
            with torch.no_grad():
                self.head.weight[dim:].zero_()
                self.head.bias[dim:] = _popularity_start(rungs, popularity_share)

    # -- per-item tables ----------------------------------------------------------------------
    def tables(self, ctx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ctx": ctx, "qkv": self.qkv(self.norm_in(ctx))}

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.heads, self.ctx_dim // self.heads)

    def _log_weights(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.log(weights.clamp_min(1e-30)).clamp_min(_MIN_LOG_WEIGHT)

    def _finish(self, newest: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        h = newest + self.out(attended.reshape(*attended.shape[:-2], self.ctx_dim))
        h = h + self.ffn(self.norm_ffn(h))
        return self.head(self.norm_out(h))

    # -- the newest position (training and publishing) ------------------------------------------
    def read(self, tables: dict[str, torch.Tensor], rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, length = rows.shape
        d, heads = self.ctx_dim, self.heads
        if length == 0 or not len(tables["ctx"]):  # no history place at all: the null slot only
            rows = torch.zeros(n, 1, dtype=torch.long, device=rows.device)
            weights = torch.zeros(n, 1, device=rows.device)
            tables = {"ctx": rows.new_zeros(1, d, dtype=torch.float32),
                      "qkv": rows.new_zeros(1, 3 * d, dtype=torch.float32)}
            length = 1
        if length > self.length:
            raise ValueError(f"history of {length} places, the tower knows {self.length}")
        valid = weights > 0
        qkv = F.embedding(rows, tables["qkv"])  # [n, L, 3d]
        q = self._split(qkv[:, 0, :d])  # [n, H, dh]
        k = self._split(qkv[..., d:2 * d] + self.pos_k[:length])  # [n, L, H, dh]
        v = self._split(qkv[..., 2 * d:] + self.pos_v[:length])
        scale = 1.0 / math.sqrt(d // heads)
        logits = torch.einsum("nhe,nlhe->nhl", q, k) * scale + self.pos_bias[:, :length] \
            + self.weight_scale[:, None] * self._log_weights(weights)[:, None, :]
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        null = (q * self._split(self.null_k)).sum(-1) * scale + self.null_bias  # [n, H]
        attention = torch.softmax(torch.cat([logits, null[..., None]], dim=-1), dim=-1)
        attended = torch.einsum("nhl,nlhe->nhe", attention[..., :length], v) \
            + attention[..., length:] * self._split(self.null_v)
        newest = F.embedding(rows[:, 0], tables["ctx"]) * valid[:, :1]
        return self._finish(newest, attended)

    # -- every position at once (the causal reference) -----------------------------------------
    def every_position(self, ctx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[n, L, out]: the tower's output at each position of newest-first histories, each
        position seeing itself and older ones only (causal mask, ages relative to it).
        ``every_position(...)[:, 0]`` is what ``read`` gives for the same history."""
        n, length, d = ctx.shape
        qkv = self.qkv(self.norm_in(ctx))
        age = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # [i, j]: j - i
        causal = age >= 0  # newest first: position i sees j >= i
        age = age.clamp_min(0)
        q = self._split(qkv[..., :d])  # [n, L, H, dh]
        k = self._split(qkv[..., None, :, d:2 * d] + self.pos_k[age])  # [n, Li, Lj, H, dh]
        v = self._split(qkv[..., None, :, 2 * d:] + self.pos_v[age])
        scale = 1.0 / math.sqrt(d // self.heads)
        valid = weights > 0
        logits = torch.einsum("nihe,nijhe->nhij", q, k) * scale + self.pos_bias[:, age] \
            + self.weight_scale[:, None, None] * self._log_weights(weights)[:, None, None, :]
        logits = logits.masked_fill(~(causal[None, None] & valid[:, None, None, :]), float("-inf"))
        null = torch.einsum("nihe,he->nhi", q, self._split(self.null_k)) * scale + self.null_bias[:, None]
        attention = torch.softmax(torch.cat([logits, null[..., None]], dim=-1), dim=-1)
        attended = torch.einsum("nhij,nijhe->nihe", attention[..., :length], v) \
            + attention[..., length].permute(0, 2, 1)[..., None] * self._split(self.null_v)
        return self._finish(ctx * valid[..., None], attended)


def build_tower(kind: str, dim: int, rungs: int, popularity_share: float, history_length: int,
                heads: int) -> nn.Module:
    if kind == "attention":
        return AttentionTower(dim, rungs, popularity_share, history_length, heads)
    if kind == "sum":
        return SumTower(dim, rungs, popularity_share)
    raise ValueError(f"unknown user tower {kind!r}; choose attention or sum")
