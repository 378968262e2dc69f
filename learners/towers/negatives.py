"""Sampled softmax over mixed negatives with the sampling-bias (log-Q) correction.

Each training event's item is scored against two kinds of negatives: items
drawn uniformly from the catalogue, and the other events' items of the same
minibatch (in-batch negatives, Yi et al. 2019). In-batch negatives come for
free (their vectors are computed anyway) and are the items users actually
pick, so they are the hard ones; but they are drawn in proportion to
popularity, and a softmax over them alone would learn to push popular items
down. The correction subtracts from every logit the log of how many times
that item is expected among the negatives,

    log q_j = log(uniform / n_items + in_batch * p_j),

with p_j the share of training targets that are item j (all-time event
frequencies, ``learners.statistics.popularity``), so the corrected sampled softmax
estimates the full softmax over the catalogue and scores stay comparable
across items of any popularity. With uniform negatives only, q_j is the same
for every item and the correction changes nothing.
"""

from __future__ import annotations

import torch


def log_q(frequency: torch.Tensor, uniform: int, in_batch: int, n_items: int) -> torch.Tensor:
    """Log of the expected count of each item among the negatives, for the given frequencies."""
    return torch.log(uniform / max(n_items, 1) + in_batch * frequency)


def corrected_logits(users: torch.Tensor, pos: torch.Tensor, pos_vecs: torch.Tensor, neg: torch.Tensor,
                     neg_vecs: torch.Tensor, pos_freq: torch.Tensor, neg_freq: torch.Tensor, n_items: int,
                     in_batch: bool, temperature: float) -> torch.Tensor:
    """[batch, 1 + negatives] logits for the cross-entropy, column 0 the event's own item.

    The correction applies at the softmax's scale: dot / temperature - log q.
    Columns: the positive, the uniform negatives ``neg``, then (``in_batch``) every event's item
    of the batch. A column that is the row's own item is no negative (-inf).
    """
    uniform, batch = len(neg), len(pos) if in_batch else 0
    cand, cand_vecs, cand_freq = neg, neg_vecs, neg_freq
    if in_batch:
        cand = torch.cat([neg, pos])
        cand_vecs = torch.cat([neg_vecs, pos_vecs])
        cand_freq = torch.cat([neg_freq, pos_freq])
    pos_logit = (users * pos_vecs).sum(-1, keepdim=True) / temperature \
        - log_q(pos_freq, uniform, batch, n_items)[:, None]
    cand_logits = users @ cand_vecs.T / temperature - log_q(cand_freq, uniform, batch, n_items)[None, :]
    cand_logits = cand_logits.masked_fill(cand[None, :] == pos[:, None], float("-inf"))
    return torch.cat([pos_logit, cand_logits], dim=1)
