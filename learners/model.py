"""The two-tower recommender on top of the text encoder.

item vector  = normalise(text_proj(text features) + item_emb[row])
context      = ctx_proj(text features) + ctx_emb[row]
user vector  = normalise(global_ctx + sum_j w_j * context[history_j])

User and item vectors live in one space; dot(user, item) is the score. The
learned id parts carry collaborative signal, the text part carries meaning and
serves items before anyone has interacted with them (cold start). Training is
a sampled softmax: each event's item against shared uniform negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from learners.encoder import TopLayers
from learners.features import ItemFeatures

_ROW_CHUNK = 4096


class TwoTower(nn.Module):
    # Id tables: a step reaches a few of their rows; RowSparseAdam and the EWC plugin
    # update only those rows (see learners/optim.py).
    row_sparse_params = ("item_emb", "ctx_emb")

    def __init__(self, top: TopLayers, features: ItemFeatures, hidden_size: int, dim: int,
                 negatives: int, temperature: float, device: torch.device, text_batch: int = 0) -> None:
        super().__init__()
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
        return True

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
        return F.normalize(self._text(rows, self.text_proj, train_top) + self.item_emb[rows], dim=-1)

    def context_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return self._text(rows, self.ctx_proj, False) + self.ctx_emb[rows]

    def user_vectors(self, hist_rows: torch.Tensor, hist_weights: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(hist_rows, return_inverse=True)
        ctx = self.context_vectors(unique)[inverse]  # [users, length, dim]
        summed = self.global_ctx + (hist_weights.unsqueeze(-1) * ctx).sum(1)
        return F.normalize(summed, dim=-1)

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
