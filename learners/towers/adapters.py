"""LoRA adapters (peft) on the encoder's top layers, and the state dicts of what trains.

Exporting a trained encoder (as a peft adapter folder or merged weights) is
``learners.checkpoint.export``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from learners.errors import ConfigError


def lora_config(rank: int, alpha: float, targets: Sequence[str], layers: Optional[Sequence[int]] = None,
                layers_pattern: Optional[str] = None):
    from peft import LoraConfig

    kwargs = {}
    if layers is not None:
        kwargs.update(layers_to_transform=list(layers), layers_pattern=layers_pattern)
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(targets), lora_dropout=0.0,
                      bias="none", **kwargs)


def add_lora(layers: nn.ModuleList, *, rank: int, alpha: float, targets: Sequence[str]) -> nn.ModuleList:
    """Inject LoRA adapters (peft, adapter name ``default``) into ``layers`` in place;
    afterwards only the adapter weights of ``layers`` require gradients."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(lora_config(rank, alpha, targets), layers)
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {list(targets)} found no modules in the top layers "
                          f"(--lora-targets): {exc}") from exc
    for name, param in layers.named_parameters():
        param.requires_grad_(".lora_" in f".{name}")
    return layers


# -- trainable state -----------------------------------------------------------------------------------

def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the parameters that train (e.g. for a checkpoint of a LoRA model)."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if sorted(params) != sorted(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ConfigError(f"trainable parameters differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in state.items():
        params[name].copy_(value)


__all__ = ["add_lora", "lora_config", "trainable_parameters", "trainable_state_dict", "load_trainable_state_dict"]
