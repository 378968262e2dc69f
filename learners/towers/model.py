"""The two-tower recommender on top of the text encoder.

item vector = [sqrt(1 - |p_i|^2) * normalise(text_proj(text features) + item_emb[row]), p_i]
context     = ctx_proj(text features) + ctx_emb[row]
user vector = [sqrt(1 - b_u^2) * normalise(m_u), b_u * normalise(a_u)]
              where (m_u, logit b_u, a_u) = user tower(context of the user's recent items)

User and item vectors live in one space; dot(user, item) is the score. The
learned id parts carry collaborative signal, the text part carries meaning and
serves items before anyone has interacted with them (cold start). The user
tower (``learners.towers.user_tower``) reads the order of the user's recent items.

Popularity: p_i = popularity_weight * f_i / sqrt(rungs), f_i the item's
log-scaled decayed event counts on every rung of ``learners.statistics.popularity``
(half-lives relative to the catalogue size), so an item's vector says how
popular it is now at several time scales. The user side holds the user's
share of popularity b_u and which rungs they follow (a_u), both from the
user tower: how much recency of popularity matters, and at which time scale,
is learned per user instead of fixed. Both vectors stay unit length. Counts
are statistics, not parameters: they move with the stream, not with gradients.

Training is a softmax of each event's item against either the whole
catalogue (``full_softmax``: every item is a negative, so no sampling bias
to correct) or a sample of it, uniform and in-batch negatives with the log-Q
correction (``learners.towers.negatives``). The full softmax is affordable because
with a frozen encoder an item's vector is a projection of cached features
plus its id row: scoring a minibatch against every item is one matrix
product the size of the catalogue.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from learners.statistics import item_evidence
from learners.encoder import TopLayers
from learners.state.features import ItemFeatures
from learners.towers.negatives import corrected_logits
from learners.statistics.popularity import PopularityLadder, parse_half_lives
from learners.towers.user_tower import build_tower

_ROW_CHUNK = 4096
_START_USER_POPULARITY = 0.5  # the users' share of popularity before anything is learned


class TwoTower(nn.Module):
    # Id tables: a step reaches a few of their rows; they are looked up with sparse
    # gradients, and RowSparseAdam and the EWC plugin update only those rows.
    row_sparse_params = ("item_emb", "ctx_emb")
    # What item vectors are made of (besides the shared encoder top): the serving average's scope.
    item_side_params = ("item_emb", "text_proj")

    def __init__(self, top: TopLayers, features: ItemFeatures, hidden_size: int, dim: int,
                 negatives: int, temperature: float, device: torch.device, text_batch: int = 0,
                 popularity_weight: float = 0.0, popularity_half_lives: str = "0.25,1,4,16",
                 user_tower: str = "attention", history_length: int = 64, heads: int = 2,
                 in_batch_negatives: bool = True, full_softmax: bool = False) -> None:
        super().__init__()
        if not 0.0 <= popularity_weight < 1.0:
            raise ValueError("popularity_weight must lie in [0, 1)")
        self.popularity_weight = popularity_weight
        self.ladder = PopularityLadder(parse_half_lives(popularity_half_lives))
        self.pop_dims = self.ladder.rungs if popularity_weight > 0 else 0
        if dim - self.pop_dims < 2:
            raise ValueError(f"vector dim {dim} leaves no room next to {self.pop_dims} popularity coordinates")
        self.out_dim = dim
        dim = dim - self.pop_dims  # the learned part
        # At most this many distinct positives per step run through the trainable top (with
        # gradient); the rest use their cached pooled features. 0: all of them.
        self.text_batch = text_batch
        self.text_trained: set[int] = set()  # rows whose text went through the top since last asked
        self.top = top
        self.features = features  # cached text features (not parameters)
        self.dim = dim
        self.negatives = negatives
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.full_softmax = full_softmax
        self.tower = build_tower(user_tower, dim, self.pop_dims, _START_USER_POPULARITY, history_length, heads)
        self.ctx_dim = self.tower.ctx_dim
        self.text_proj = nn.Linear(hidden_size, dim)
        self.ctx_proj = nn.Linear(hidden_size, self.ctx_dim)
        self.item_emb = nn.Parameter(torch.zeros(0, dim))
        self.ctx_emb = nn.Parameter(torch.zeros(0, self.ctx_dim))
        # Decayed event counts per row and rung (statistics: never trained, but saved with the model).
        self.popularity = nn.Parameter(torch.zeros(0, self.ladder.rungs), requires_grad=False)
        # What each item's events say beyond their count (learners.statistics.item_evidence; statistics too).
        self.evidence = nn.Parameter(item_evidence.empty(0), requires_grad=False)
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
            fresh = torch.randn(new_cap, old.shape[1], device=old.device) * 0.01
            fresh[: old.shape[0]] = old
            setattr(self, name, nn.Parameter(fresh))
        counts = torch.zeros(new_cap, self.ladder.rungs, device=self.popularity.device)
        counts[: self.popularity.shape[0]] = self.popularity.data
        self.popularity = nn.Parameter(counts, requires_grad=False)
        evidence = item_evidence.empty(new_cap, self.evidence.device)
        evidence[: self.evidence.shape[0]] = self.evidence.data
        self.evidence = nn.Parameter(evidence, requires_grad=False)
        return True

    # -- popularity -----------------------------------------------------------------
    @torch.no_grad()
    def observe_popularity(self, rows: torch.Tensor, weights: torch.Tensor | None = None,
                           counted: torch.Tensor | None = None, established: torch.Tensor | None = None) -> None:
        """Count events of ``rows`` (in event order) on every rung of the popularity ladder, and
        with their event ``weights`` (NaN: not known) into the items' evidence. ``counted`` /
        ``established`` (``learners.statistics.credibility``; default 1 each): whether each event counts on
        what every user shares (0: the user's repeat of the item), and how established its user was."""
        position = float(self.evidence.data[:, item_evidence.EVENTS].sum())
        self.ladder.observe(self.popularity.data, rows, self.n_items, counted)
        if weights is None:
            weights = torch.full((len(rows),), float("nan"), dtype=torch.float64)
        item_evidence.observe(self.evidence.data, rows, weights, position, counted, established)

    @torch.no_grad()
    def shared_counts(self) -> torch.Tensor:
        """[n_items, rungs]: the popularity counts every user's score reads. The rungs as counted
        (users' repeats of an item left out), and each item's row scaled by its discount
        (``item_evidence.discount``): an item whose events come mostly from users with no other
        history keeps little of its count."""
        n = self.n_items
        table = self.evidence.data
        counts = torch.cat([self.popularity.data[:n, :-1],
                            table[:n, item_evidence.COUNTED:item_evidence.COUNTED + 1].to(self.popularity.dtype)], 1)
        return counts * item_evidence.discount(table, n).to(counts.dtype)[:, None]

    @torch.no_grad()
    def discount(self) -> torch.Tensor:
        """[n_items] in [0, 1]: how much of its shared statistics each item keeps (``item_evidence.discount``)."""
        return item_evidence.discount(self.evidence.data, self.n_items)

    @torch.no_grad()
    def conversion(self) -> torch.Tensor:
        """[n_items]: each item's events' strength against the stream's (``item_evidence.conversion``)."""
        return item_evidence.conversion(self.evidence.data, self.n_items)

    @torch.no_grad()
    def newness(self) -> torch.Tensor:
        """[n_items] in [0, 1]: how recently each item had its first event (``item_evidence.newness``)."""
        return item_evidence.newness(self.evidence.data, self.n_items)

    @torch.no_grad()
    def rising(self, evidence: float) -> torch.Tensor:
        """[n_items]: how busy each item is now, faded by its events of all time (``PopularityLadder.rising``),
        from the shared counts."""
        return self.ladder.rising(self.shared_counts(), self.n_items, evidence)

    def finish_items(self, learned: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Unit learned item parts -> published item vectors (popularity coordinates added)."""
        if not self.pop_dims:
            return learned
        features = self.ladder.features(self.shared_counts(), rows, self.n_items).to(learned.device, learned.dtype)
        prior = features * (self.popularity_weight / math.sqrt(self.pop_dims))
        scale = torch.sqrt(1.0 - (prior * prior).sum(-1, keepdim=True))
        return torch.cat([learned * scale, prior], dim=-1)

    def finish_users(self, out):
        """User tower outputs (torch or numpy, [n, dim (+ 1 + rungs)]) -> unit user vectors."""
        if isinstance(out, np.ndarray):  # the publishing path: same maths, numpy out
            return self.finish_users(torch.from_numpy(out)).numpy()
        unit = F.normalize(out[:, :self.dim], dim=-1)
        if not self.pop_dims:
            return unit
        share = torch.sigmoid(out[:, self.dim:self.dim + 1])
        rungs = F.normalize(out[:, self.dim + 1:], dim=-1)
        return torch.cat([unit * torch.sqrt(1.0 - share * share), rungs * share], dim=-1)

    # -- towers ---------------------------------------------------------------
    def _text(self, rows: torch.Tensor, proj: nn.Linear, train_top: bool) -> torch.Tensor:
        """Projected text part for rows (zero where no text)."""
        feats = self.features
        has = feats.has_text[rows.cpu()].to(rows.device)
        out = torch.zeros(len(rows), proj.out_features, device=rows.device)
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
        """Unit user vectors of newest-first histories (the training path: only the rows used)."""
        unique, inverse = torch.unique(hist_rows, return_inverse=True)
        tables = self.tower.tables(self.context_vectors(unique))
        return self.finish_users(self.tower.read(tables, inverse.reshape(hist_rows.shape), hist_weights))

    def users_from_tables(self, tables: dict[str, torch.Tensor], hist_rows: torch.Tensor,
                          hist_weights: torch.Tensor) -> torch.Tensor:
        """Unit user vectors from ``user_tables()`` (the publishing path)."""
        return self.finish_users(self.tower.read(tables, hist_rows, hist_weights))

    # -- training -------------------------------------------------------------
    def forward(self, mbatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, target column): each event's item scored against its negatives."""
        hist_rows, hist_weights, pos = mbatch[0], mbatch[1], mbatch[2]
        users = self.user_vectors(hist_rows, hist_weights)
        unique_pos, inverse = torch.unique(pos, return_inverse=True)
        pos_vecs = self.item_vectors(unique_pos, train_top=True)
        if self.full_softmax:
            return self._full_logits(users, unique_pos, pos_vecs), pos
        pos_vecs = pos_vecs[inverse]
        neg = torch.randint(0, self.n_items, (self.negatives,), device=pos.device)
        neg_vecs = self.item_vectors(neg)
        counts = self.popularity.data
        logits = corrected_logits(users, pos, pos_vecs, neg, neg_vecs, self.ladder.frequency(counts, pos),
                                  self.ladder.frequency(counts, neg), self.n_items, self.in_batch_negatives,
                                  self.temperature)
        return logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device)

    def _full_logits(self, users: torch.Tensor, unique_pos: torch.Tensor, pos_vecs: torch.Tensor) -> torch.Tensor:
        """[batch, n_items] logits over the whole catalogue. The positives' rows are the vectors
        computed through the trainable top (when there is one), so its gradient still flows."""
        rows = torch.arange(self.n_items, device=users.device)
        items = self.item_vectors(rows).index_put((unique_pos,), pos_vecs)
        return users @ items.T / self.temperature

    @staticmethod
    def loss(output: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits, target = output
        return F.cross_entropy(logits, target)

    # -- tables for publishing -----------------------------------------------------
    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        rows = torch.arange(self.n_items, device=self.item_emb.device)
        return self.item_vectors(rows)

    @torch.no_grad()
    def user_tables(self) -> dict[str, torch.Tensor]:
        """The user tower's per-item tables over the catalogue (``users_from_tables`` reads them)."""
        rows = torch.arange(self.n_items, device=self.item_emb.device)
        return self.tower.tables(self.context_vectors(rows))


def _lookup(table: nn.Parameter, rows: torch.Tensor) -> torch.Tensor:
    """Rows of an id table; the gradient is sparse (only these rows), so backward never
    fills a zero gradient the size of the catalogue and the optimizer needs no scan."""
    return F.embedding(rows, table, sparse=True)
