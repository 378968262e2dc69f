"""The two-tower recommender on top of the text encoder.

item vector  = [sqrt(1 - b_i^2) * normalise(text_proj(text features) + item_emb[row]), b_i]
context      = ctx_proj(text features) + ctx_emb[row]
user vector  = [sqrt(1 - beta^2) * normalise(global_ctx + sum_j w_j * context[history_j]), beta]

User and item vectors live in one space; dot(user, item) is the score. The
learned id parts carry collaborative signal, the text part carries meaning and
serves items before anyone has interacted with them (cold start). Training is
a sampled softmax: each event's item against shared uniform negatives.

The last coordinate is a popularity prior: b_i = popularity_weight *
log(1 + c_i) / log(1 + max c), with c_i the item's event count decayed with a
half-life of ``popularity_half_life`` events (what is popular *now*), and beta
the same constant for every user. Both vectors stay unit length, so the score
is a fixed mix of "popular now" and the learned personal match; the learned
part only has to explain what popularity does not. Counts are statistics, not
parameters: they move with the stream, not with gradients.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learners.encoder import TopLayers
from learners.features import ItemFeatures

_ROW_CHUNK = 4096


class TwoTower(nn.Module):
    # Id tables: a step reaches a few of their rows; they are looked up with sparse
    # gradients, and RowSparseAdam and the EWC plugin update only those rows.
    row_sparse_params = ("item_emb", "ctx_emb")
    # What item vectors are made of (besides the shared encoder top): the serving average's scope.
    item_side_params = ("item_emb", "text_proj")

    def __init__(self, top: TopLayers, features: ItemFeatures, hidden_size: int, dim: int,
                 negatives: int, temperature: float, device: torch.device, text_batch: int = 0,
                 popularity_weight: float = 0.0, popularity_half_life: float = 10_000.0,
                 user_popularity: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= popularity_weight < 1.0 or not 0.0 <= user_popularity < 1.0:
            raise ValueError("popularity_weight and user_popularity must lie in [0, 1)")
        self.popularity_weight = popularity_weight
        self.user_popularity = user_popularity if popularity_weight > 0 else 0.0
        self.popularity_decay = 0.5 ** (1.0 / popularity_half_life) if popularity_half_life > 0 else 1.0
        self.out_dim = dim
        dim = dim - 1 if popularity_weight > 0 else dim  # the learned part
        # At most this many distinct positives per step run through the trainable top (with
        # gradient); the rest use their cached pooled features. 0: all of them.
        self.text_batch = text_batch
        self.text_trained: set[int] = set()  # rows whose text went through the top since last asked
        self.top = top
        self.features = features  # cached text features (not parameters)
        self.dim = dim
        self.negatives = negatives
        self.temperature = temperature
        self.text_proj = nn.Linear(hidden_size, dim)
        self.ctx_proj = nn.Linear(hidden_size, dim)
        self.item_emb = nn.Parameter(torch.zeros(0, dim))
        self.ctx_emb = nn.Parameter(torch.zeros(0, dim))
        # Unit-scale start: a zero sum would put cold users at normalise(0), whose gradient explodes.
        self.global_ctx = nn.Parameter(torch.randn(dim) / dim ** 0.5)
        # Decayed event counts per row (a statistic: never trained, but saved with the model).
        self.popularity = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.n_items = 0
        self._device = device
        self.grow(1)

    # -- capacity -------------------------------------------------------------
    def grow(self, n_items: int) -> bool:
        """Make room for ``n_items`` rows; returns True when parameters were replaced."""
        self.n_items = max(self.n_items, n_items)
        if n_items <= self.item_emb.shape[0]:
            return False
        new_cap = max(n_items, _ROW_CHUNK, 2 * self.item_emb.shape[0])
        for name in ("item_emb", "ctx_emb"):
            old = getattr(self, name).data
            fresh = torch.randn(new_cap, self.dim, device=old.device) * 0.01
            fresh[: old.shape[0]] = old
            setattr(self, name, nn.Parameter(fresh))
        counts = torch.zeros(new_cap, device=self.popularity.device)
        counts[: self.popularity.shape[0]] = self.popularity.data
        self.popularity = nn.Parameter(counts, requires_grad=False)
        return True

    # -- popularity prior -------------------------------------------------------
    @torch.no_grad()
    def observe_popularity(self, rows: torch.Tensor) -> None:
        """Count events of ``rows`` (in event order) into the decayed popularity."""
        n = len(rows)
        if n == 0 or self.popularity_weight <= 0:
            return
        counts = self.popularity.data
        counts.mul_(self.popularity_decay ** n)
        ages = torch.arange(n - 1, -1, -1, dtype=counts.dtype, device=counts.device)
        counts.index_add_(0, rows.to(counts.device), self.popularity_decay ** ages)

    def _prior(self, rows: torch.Tensor) -> torch.Tensor:
        counts = self.popularity.data
        if not len(counts):
            return torch.zeros(len(rows), device=counts.device)
        # All on the device (no float() of the maximum: on a GPU that waits for every queued
        # step, once per forward). Counts are never negative: with none yet, every log is 0.
        top = torch.log1p(counts[: max(self.n_items, 1)].max())
        return self.popularity_weight * torch.log1p(counts[rows]) / torch.where(top > 0, top, torch.ones_like(top))

    def finish_items(self, learned: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Unit learned item parts -> published item vectors (popularity coordinate added)."""
        if self.popularity_weight <= 0:
            return learned
        prior = self._prior(rows).to(learned.device, learned.dtype)
        return torch.cat([learned * torch.sqrt(1.0 - prior * prior).unsqueeze(-1), prior.unsqueeze(-1)], dim=-1)

    def finish_users(self, summed):
        """Summed contexts (torch or numpy, [n, dim]) -> unit user vectors (prior coordinate added)."""
        if isinstance(summed, np.ndarray):  # the publishing path: same maths, numpy out
            return self.finish_users(torch.from_numpy(summed)).numpy()
        unit = F.normalize(summed, dim=-1)
        if self.popularity_weight <= 0:
            return unit
        beta = self.user_popularity
        return torch.cat([unit * math.sqrt(1.0 - beta * beta), unit.new_full((len(unit), 1), beta)], dim=-1)

    # -- towers ---------------------------------------------------------------
    def _text(self, rows: torch.Tensor, proj: nn.Linear, train_top: bool) -> torch.Tensor:
        """Projected text part for rows (zero where no text)."""
        feats = self.features
        has = feats.has_text[rows.cpu()].to(rows.device)
        out = torch.zeros(len(rows), self.dim, device=rows.device)
        if not bool(has.any()):
            return out
        with_text = rows[has]
        pooled = feats.pooled[with_text.cpu()].to(rows.device)
        if train_top and self.top.trainable:
            pick = torch.arange(len(with_text), device=rows.device)
            if 0 < self.text_batch < len(pick):
                pick = torch.randperm(len(pick), device=rows.device)[: self.text_batch]
            chosen = with_text[pick].tolist()
            self.text_trained.update(chosen)
            fresh = self.top([feats.frozen[r] for r in chosen], rows.device)
            pooled = pooled.index_put((pick,), fresh)
        out[has] = proj(pooled)
        return out

    def item_vectors(self, rows: torch.Tensor, train_top: bool = False) -> torch.Tensor:
        learned = F.normalize(self._text(rows, self.text_proj, train_top) + _lookup(self.item_emb, rows), dim=-1)
        return self.finish_items(learned, rows)

    def context_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return self._text(rows, self.ctx_proj, False) + _lookup(self.ctx_emb, rows)

    def user_vectors(self, hist_rows: torch.Tensor, hist_weights: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(hist_rows, return_inverse=True)
        ctx = self.context_vectors(unique)[inverse]  # [users, length, dim]
        summed = self.global_ctx + (hist_weights.unsqueeze(-1) * ctx).sum(1)
        return self.finish_users(summed)

    # -- training -------------------------------------------------------------
    def forward(self, mbatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of each event's item (column 0) against shared uniform negatives."""
        hist_rows, hist_weights, pos = mbatch[0], mbatch[1], mbatch[2]
        users = self.user_vectors(hist_rows, hist_weights)
        unique_pos, inverse = torch.unique(pos, return_inverse=True)
        pos_vecs = self.item_vectors(unique_pos, train_top=True)[inverse]
        neg = torch.randint(0, self.n_items, (self.negatives,), device=pos.device)
        neg_vecs = self.item_vectors(neg)
        pos_logit = (users * pos_vecs).sum(-1, keepdim=True)
        neg_logits = users @ neg_vecs.T
        # A negative that happens to be the event's own item is no negative.
        neg_logits = neg_logits.masked_fill(neg[None, :] == pos[:, None], float("-inf"))
        logits = torch.cat([pos_logit, neg_logits], dim=1) / self.temperature
        return logits, pos

    @staticmethod
    def loss(output: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits, _ = output
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))

    # -- tables for publishing -----------------------------------------------------
    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        rows = torch.arange(self.n_items, device=self.item_emb.device)
        return self.item_vectors(rows)

    @torch.no_grad()
    def context_table(self) -> torch.Tensor:
        rows = torch.arange(self.n_items, device=self.item_emb.device)
        return self.context_vectors(rows)


def _lookup(table: nn.Parameter, rows: torch.Tensor) -> torch.Tensor:
    """Rows of an id table; the gradient is sparse (only these rows), so backward never
    fills a zero gradient the size of the catalogue and the optimizer needs no scan."""
    return F.embedding(rows, table, sparse=True)
