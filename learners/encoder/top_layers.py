"""``TopLayers``: the trainable top of the encoder, run over cached bottom token states, then pooled."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from learners.encoder.pooling import MASKED, additive_mask, pool, position_ids_from_mask
from learners.encoder.precision import bf16_autocast


class TopLayers(nn.Module):
    """The trainable top of the encoder: layers over cached token states, then pooling.

    ``forward(features, device)`` takes per-text cached bottom states
    ([tokens, hidden], any float dtype) and returns pooled vectors [n, hidden]
    in fp32. Without layers the features are already pooled vectors.
    """

    def __init__(self, layers: Optional[Sequence[nn.Module]] = None, *, family: str = "encoder",
                 pooling: Optional[str] = None, norm: Optional[nn.Module] = None,
                 rotary: Optional[nn.Module] = None, train_params: str = "top",
                 gradient_checkpointing: bool = False, mixed_precision: bool = True) -> None:
        super().__init__()
        self.family = family
        self.pooling = pooling or ("last_token" if family == "decoder" else "mean")
        self.train_params = train_params
        self.gradient_checkpointing = gradient_checkpointing
        self.mixed_precision = mixed_precision  # bf16 autocast on CUDA
        self.layers = nn.ModuleList(list(layers)) if layers is not None else None
        self.norm = norm if layers is not None else None
        self.rotary = rotary if layers is not None else None
        if self.layers is not None and train_params in ("top", "full"):
            for param in self.layers.parameters():
                param.requires_grad_(True)
            if self.norm is not None:
                for param in self.norm.parameters():
                    param.requires_grad_(True)
        # Its state dict holds what trains, not the frozen weights under LoRA adapters (those
        # come from the model folder): checkpoints cover exactly the trainable parameters.
        self.register_state_dict_post_hook(_drop_frozen_state)
        self.register_load_state_dict_pre_hook(_keep_frozen_on_load)

    @property
    def trainable(self) -> bool:
        return self.layers is not None

    def __deepcopy__(self, memo: dict) -> "TopLayers":
        """Copies share frozen parameters and buffers (they never change): a LoRA top
        copied per learner costs its adapters, not the layers under them."""
        for param in self.parameters():
            if not param.requires_grad:
                memo[id(param)] = param
        for buffer in self.buffers():
            memo[id(buffer)] = buffer
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def forward(self, features: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        if self.layers is None:
            return torch.stack([f.to(torch.float32) for f in features]).to(device)
        states = nn.utils.rnn.pad_sequence([f.to(torch.float32) for f in features], batch_first=True).to(device)
        lengths = torch.tensor([f.shape[0] for f in features], device=device)
        mask = torch.arange(states.shape[1], device=device)[None, :] < lengths[:, None]
        with bf16_autocast(device, self.mixed_precision):
            states = self.run(states, mask)
        return pool(states.float(), mask, self.pooling)

    def run(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Top layers (and a decoder's final norm) over padded bottom states [n, tokens, hidden]."""
        decoder = self.family == "decoder"
        if decoder:
            attn = additive_mask(mask, causal=True, dtype=states.dtype)
            position_ids = position_ids_from_mask(mask)
            kwargs: dict = {"position_ids": position_ids}
            if self.rotary is not None:
                kwargs["position_embeddings"] = self.rotary(states, position_ids)
        else:
            attn = (~mask)[:, None, None, :].to(states.dtype) * MASKED
            kwargs = {}
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpoint:
                out = torch.utils.checkpoint.checkpoint(_call_layer, layer, states, attn, kwargs, use_reentrant=False)
            else:
                out = _call_layer(layer, states, attn, kwargs)
            states = out
        if decoder and self.norm is not None:
            states = self.norm(states)
        return states


def _drop_frozen_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for name, param in module.named_parameters():
        if not param.requires_grad:
            state_dict.pop(prefix + name, None)


def _keep_frozen_on_load(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name, param in module.named_parameters():
        if not param.requires_grad and prefix + name not in state_dict:
            state_dict[prefix + name] = param.detach()


def _call_layer(layer: nn.Module, states: torch.Tensor, attn: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(states, attention_mask=attn, **kwargs)
    return out[0] if isinstance(out, tuple) else out
