"""Where a Hugging Face model keeps its transformer layers, a decoder's final norm and rotary table."""

from __future__ import annotations

from typing import Optional

from torch import nn

from learners.errors import ModelLoadError


def unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a peft PeftModel
    return get_base() if callable(get_base) else model


def layer_path(model: nn.Module) -> str:
    model = unwrap(model)
    for path in ("encoder.layer", "layers", "model.layers", "model.encoder.layer"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return path
    raise ModelLoadError(
        f"{type(model).__name__}: cannot find its transformer layers (encoder.layer or layers); "
        "use --train-layers 0 for this model")


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of the model (BERT ``encoder.layer`` or decoder ``layers``)."""
    obj = unwrap(model)
    for part in layer_path(model).split("."):
        obj = getattr(obj, part)
    return obj


def decoder_parts(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """A decoder's final norm and its shared rotary embedding (None in old transformers versions)."""
    model = unwrap(model)
    owner = getattr(model, "model", model) if not hasattr(model, "layers") else model
    norm = next((getattr(owner, n) for n in ("norm", "final_layernorm", "final_layer_norm")
                 if isinstance(getattr(owner, n, None), nn.Module)), None)
    if norm is None:
        raise ModelLoadError(f"{type(model).__name__}: cannot find the final norm (model.norm) of this decoder; "
                             "use --train-layers 0 for this model")
    return norm, getattr(owner, "rotary_emb", None)
