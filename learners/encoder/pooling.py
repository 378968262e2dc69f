"""Pooling of padded token states into one vector per text, and the attention masks the top layers use."""

from __future__ import annotations

import torch


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def last_token_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The state of each row's last real token, whatever the padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions[None, :] * mask.long()).argmax(-1)
    return states[torch.arange(states.shape[0], device=states.device), last]


def cls_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    first = mask.long().argmax(-1)  # first real token (0 under right padding)
    return states[torch.arange(states.shape[0], device=states.device), first]


def pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "last_token":
        return last_token_pool(states, mask)
    if pooling == "cls":
        return cls_pool(states, mask)
    return mean_pool(states, mask)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over each row's real tokens, under left or right padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# bf16's most negative finite value: representable in fp32 and bf16 alike (autocast casts masks).
MASKED = float(torch.finfo(torch.bfloat16).min)


def additive_mask(mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """[n, 1, q, k] additive mask: padding keys (and later keys when causal) are masked.

    Every query may attend to itself, so no row is fully masked (padded rows
    stay finite and never poison gradients); real rows are unaffected.
    """
    n, length = mask.shape
    allowed = mask.bool()[:, None, None, :].expand(n, 1, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=mask.device)
    out = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~allowed, MASKED)
