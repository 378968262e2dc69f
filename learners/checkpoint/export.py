"""Exporting a trained learner's text encoder: a peft adapter folder, or a merged model folder.

``export_model(learner, out_dir, merged)`` writes what a user loads elsewhere:

merged=False (``--train-params lora`` only)
    ``out_dir`` is a peft adapter folder (``adapter_config.json`` naming the
    base model folder, ``adapter_model.safetensors``), plus the tokenizer and
    ``recstream.json``. Load it with plain transformers + peft::

        base = AutoModel.from_pretrained(adapter_config["base_model_name_or_path"])
        model = PeftModel.from_pretrained(base, out_dir)          # or .merge_and_unload()

merged=True (any training mode)
    ``out_dir`` is a complete Hugging Face model folder with the trained
    layers (LoRA merged into the weights), the tokenizer, ``recstream.json``
    and the base folder's sentence-transformers files, if any.

Either folder also loads with ``load_exported(out_dir)`` (or ``TextEncoder``),
which applies the folder's pooling, padding side and document prompt, so its
``pooled(texts)`` are the learner's text vectors (before the two-tower
projection, which is not part of the encoder).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from learners.towers.adapters import lora_config
from learners.encoder import TextEncoder, TopLayers
from learners.encoder.layers import decoder_parts, encoder_layers, layer_path
from learners.errors import ConfigError

if TYPE_CHECKING:
    from learners.learner import ContinualRecommender

_ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def export_model(learner: "ContinualRecommender", out_dir: str | Path, merged: bool = False, *,
                 split: bool = False, frozen_shard: Optional[Path] = None) -> Path:
    """Write the learner's trained text encoder to ``out_dir`` (see the module docstring).

    merged=False needs a LoRA learner (``train_params="lora"``): the adapter in
    peft's own format on top of the base model folder. merged=True writes full
    weights for any learner (LoRA deltas added into the weights). Nothing of
    the base model is copied in memory: its state dict is written with the
    trained layers' tensors swapped in. Returns ``out_dir``.

    ``split`` (merged only) writes the weights as two shards under a standard
    ``model.safetensors.index.json``: ``FROZEN_SHARD`` (every tensor training
    never changes) and ``TRAINED_SHARD``. ``frozen_shard``, an existing frozen
    shard of this same encoder and split, is hard-linked instead of written
    again: checkpoints re-export the model often, and its frozen part is most
    of the bytes (``CheckpointStore``).
    """
    encoder: TextEncoder = learner.encoder
    top: TopLayers = learner.model.top
    mode = encoder.train_params if top.trainable else "none"
    if not merged and mode != "lora":
        raise ConfigError(f"only a LoRA learner has an adapter to export (this one trains {mode!r}); "
                          "use merged=True")
    if not merged and (Path(encoder.path) / "adapter_config.json").is_file():
        raise ConfigError(f"{encoder.path} is itself an adapter folder: export this learner with merged=True")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = encoder.model
    n_layers = len(encoder_layers(base))
    trained = list(range(n_layers - encoder.train_layers, n_layers)) if top.trainable else []
    if merged or mode != "lora":
        state = merged_state_dict(encoder, top)
        if not (split and _save_split(base, out, state, frozen_shard)):
            _save_quietly(base, out, state)
        _copy_sentence_transformers_files(Path(encoder.path), out)
    else:
        from peft import get_peft_model

        # A structural copy of the base model sharing its (frozen) tensors: peft wraps
        # the copy's modules, the adapters are the only new memory.
        memo = {id(t): t for t in (*base.parameters(), *base.buffers())}
        shell = copy.deepcopy(base, memo)
        config = lora_config(encoder.lora_rank, encoder.lora_alpha, encoder.lora_targets, trained,
                             layer_path(base).split(".")[-1])
        config.base_model_name_or_path = str(Path(encoder.path).resolve())
        model = get_peft_model(shell, config)
        layers = encoder_layers(model)
        with torch.no_grad():
            for source, index in zip(top.layers, trained):
                adapter = {k: v.detach() for k, v in source.state_dict().items() if ".lora_" in f".{k}"}
                missing = [k for k in adapter if k not in layers[index].state_dict()]
                if missing:
                    raise ConfigError(f"adapter tensors {missing[:3]} have no place in the base model's layer {index}")
                layers[index].load_state_dict(adapter, strict=False)
        model.save_pretrained(out, safe_serialization=True)
    encoder.tokenizer.save_pretrained(out)
    info = {**encoder.spec.to_json(), "max_tokens": encoder.max_tokens,
            "exported": {"base_model": str(Path(encoder.path).resolve()), "merged": bool(merged),
                         "train_params": mode, "train_layers": encoder.train_layers, "trained_layer_indices": trained,
                         "lora_rank": encoder.lora_rank if mode == "lora" else None,
                         "lora_alpha": encoder.lora_alpha if mode == "lora" else None,
                         "lora_targets": list(encoder.lora_targets) if mode == "lora" else None,
                         "model_version": int(getattr(learner, "model_version", 0))}}
    (out / "recstream.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def merged_state_dict(encoder: TextEncoder, top: TopLayers) -> dict[str, torch.Tensor]:
    """The base model's state dict with the trained top swapped in (LoRA deltas merged).

    Untouched tensors are the base model's own (no copy).
    """
    base = encoder.model
    state = dict(base.state_dict())
    if not top.trainable:
        return state
    layers = encoder_layers(base)
    modules = {id(m): name for name, m in base.named_modules()}
    prefix = modules[id(layers)]
    first = len(layers) - len(top.layers)
    swaps: dict[str, torch.Tensor] = {}
    for offset, layer in enumerate(top.layers):
        for key, value in plain_layer_state(layer).items():
            swaps[f"{prefix}.{first + offset}.{key}"] = value
    if encoder.family == "decoder" and top.norm is not None and any(p.requires_grad for p in top.norm.parameters()):
        norm, _ = decoder_parts(base)
        for key, value in top.norm.state_dict().items():
            swaps[f"{modules[id(norm)]}.{key}"] = value.detach()
    for name, value in swaps.items():
        if name not in state or state[name].shape != value.shape:
            raise ConfigError(f"cannot place trained tensor {name!r} into the base model")
        state[name] = value
    return state


@torch.no_grad()
def plain_layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A layer's state dict as the base architecture names it: LoRA wrappers unwrapped,
    their deltas (B @ A * alpha / r) added to the base weights."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for key, value in layer.state_dict().items():
        if ".lora_" in f".{key}":
            continue
        out[key.replace(".base_layer.", ".")] = value.detach()
    for name, module in layer.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                key = f"{name}.weight"
                out[key] = out[key] + module.get_delta_weight(adapter).to(out[key].dtype)
    return out


def _save_quietly(model: nn.Module, out: Path, state: dict[str, torch.Tensor]) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


FROZEN_SHARD = "model-frozen.safetensors"
TRAINED_SHARD = "model-trained.safetensors"
_SHARD_INDEX = "model.safetensors.index.json"


def _save_split(model: nn.Module, out: Path, state: dict[str, torch.Tensor], frozen_shard: Optional[Path]) -> bool:
    """Save ``state`` as a frozen and a trained shard (see ``export_model``); False, having
    written nothing, when the state dict shares storage between names (tied weights), which
    only ``save_pretrained`` knows how to de-duplicate."""
    from safetensors.torch import save_file

    own = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    pointers = [t.data_ptr() for t in state.values()]
    if len(set(pointers)) < len(pointers):
        return False
    frozen = {k: v.contiguous() for k, v in state.items() if own.get(k) == v.data_ptr()}
    trained = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in frozen}
    metadata = {"format": "pt"}
    linked = False
    if frozen_shard is not None:
        try:
            os.link(frozen_shard, out / FROZEN_SHARD)
            linked = True
        except OSError:  # gone, or a file system without hard links: write it
            pass
    if not linked:
        save_file({k: v.cpu() for k, v in frozen.items()}, out / FROZEN_SHARD, metadata=metadata)
    weight_map = dict.fromkeys(frozen, FROZEN_SHARD)
    if trained:
        save_file(trained, out / TRAINED_SHARD, metadata=metadata)
        weight_map.update(dict.fromkeys(trained, TRAINED_SHARD))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / _SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=1, sort_keys=True) + "\n")
    model.config.save_pretrained(out)
    return True


def _copy_sentence_transformers_files(source: Path, out: Path) -> None:
    for name in _ST_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    pooling = source / "1_Pooling"
    if pooling.is_dir():
        shutil.copytree(pooling, out / "1_Pooling", dirs_exist_ok=True)


def load_exported(path: str | Path, device: str | torch.device = "cpu",
                  max_tokens: Optional[int] = None) -> TextEncoder:
    """An exported folder (merged or adapter) as a frozen ``TextEncoder``: ``.pooled(texts)``."""
    info = json.loads((Path(path) / "recstream.json").read_text()) if (Path(path) / "recstream.json").is_file() else {}
    return TextEncoder(str(path), 0, int(max_tokens or info.get("max_tokens", 32)), torch.device(device))


__all__ = ["export_model", "load_exported", "merged_state_dict", "plain_layer_state", "FROZEN_SHARD", "TRAINED_SHARD"]
