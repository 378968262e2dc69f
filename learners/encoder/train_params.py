"""What of the encoder trains (``train_params``) and building the ``TopLayers`` that holds it.

``top``   the top ``train_layers`` layers (plus a decoder's final norm), fully.
``lora``  LoRA adapters (peft) on the target modules of the top ``train_layers``
          layers; nothing else of the encoder is trainable.
``full``  every transformer layer (plus the final norm); only the embeddings
          stay frozen, and their output is what gets cached.
"""

from __future__ import annotations

import copy
import logging
from typing import Sequence

from torch import nn

from learners.towers.adapters import add_lora
from learners.encoder.layers import decoder_parts, encoder_layers
from learners.encoder.top_layers import TopLayers
from learners.errors import ConfigError

log = logging.getLogger(__name__)

TRAIN_PARAMS = ("top", "lora", "full")
DEFAULT_LORA_TARGETS = {"encoder": ("query", "value"), "decoder": ("q_proj", "v_proj")}


def check_train_params(train_params: str) -> None:
    if train_params not in TRAIN_PARAMS:
        raise ConfigError(f"train_params must be one of {', '.join(TRAIN_PARAMS)}, not {train_params!r}")


def resolve_train_layers(requested: int, n_layers: int, train_params: str) -> int:
    """How many top layers train: all of them under ``full``, at most the model's depth otherwise."""
    if train_params == "full":
        return int(n_layers)
    if requested > n_layers:
        log.warning("--train-layers %d but the model has %d layers: training all of them", requested, n_layers)
        return int(n_layers)
    return int(requested)


def build_top(model: nn.Module, *, family: str, pooling: str, train_layers: int, train_params: str,
              lora_rank: int, lora_alpha: float, lora_targets: Sequence[str],
              gradient_checkpointing: bool) -> TopLayers:
    """The model's top ``train_layers`` layers (a decoder's final norm too) as a ``TopLayers``."""
    if not train_layers:
        return TopLayers(None, family=family, pooling=pooling)
    layers = list(encoder_layers(model)[-train_layers:])
    norm = rotary = None
    if family == "decoder":
        norm, rotary = decoder_parts(model)
    if train_params == "lora":
        # A copy sharing the frozen weights: the base model itself stays as shipped.
        memo = {id(p): p for p in model.parameters()}
        memo.update({id(b): b for b in model.buffers()})
        layers = copy.deepcopy(nn.ModuleList(layers), memo)
        add_lora(layers, rank=lora_rank, alpha=lora_alpha, targets=lora_targets)
    return TopLayers(layers, family=family, pooling=pooling, norm=norm, rotary=rotary,
                     train_params=train_params, gradient_checkpointing=gradient_checkpointing)
