"""Reading a local model folder: its family (encoder or decoder), pooling, prompt, and the loaded model.

Two model families, picked from the model folder itself:

``encoder``  BERT-style (``model.encoder.layer``): bidirectional attention,
             right padding, mean pooling (or CLS pooling when the folder's
             sentence-transformers ``1_Pooling/config.json`` says so).
``decoder``  Qwen2 / Llama / Mistral style (``model.layers``, ``model.norm``,
             ``model.rotary_emb``): causal + padding attention mask, rotary
             position embeddings from position ids, the final norm, then
             last-token pooling; left padding.

A folder is a decoder when its ``recstream.json`` says ``"family": "decoder"``,
or ``config.json`` has ``is_decoder`` true, an architecture ending in
``ForCausalLM`` / ``LMHeadModel``, or a ``model_type`` in ``DECODER_TYPES``.

``recstream.json`` (optional, in the model folder; every key optional)::

    {
      "family": "decoder",              # or "encoder"
      "pooling": "last_token",          # "mean", "cls" or "last_token"
      "padding_side": "left",           # tokenizer padding side
      "document_prompt": "passage: ",   # prepended to every item text
      "append_eos": true,               # append the tokenizer's EOS token (after truncation)
      "cache_dtype": "bfloat16",        # cached bottom states: float16, bfloat16 or float32
      "lora_targets": ["q_proj", "v_proj"]  # default LoRA target modules for this model
    }

Without it, a document prompt is read from ``config_sentence_transformers.json``
(``prompts`` entry ``document`` / ``passage`` / ``doc`` / ``corpus``) and the
pooling from ``1_Pooling/config.json`` when present. A folder written by
``learners.checkpoint.export.export_model`` (a merged model, or a peft adapter folder
whose ``adapter_config.json`` names the base model) loads here as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from torch import nn

from learners.encoder.precision import CACHE_DTYPES
from learners.errors import ModelLoadError
from learners.quiet import no_weight_loading_bar

POOLINGS = ("mean", "cls", "last_token")
DECODER_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi3", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "cohere", "glm",
    "ministral", "smollm3", "internlm2", "exaone", "helium",
})
_PROMPT_KEYS = ("document", "passage", "doc", "corpus")


@dataclass(frozen=True)
class EncoderSpec:
    """How to read a model folder: family, pooling, padding, document prompt."""
    family: str = "encoder"  # "encoder" | "decoder"
    pooling: str = "mean"
    padding_side: str = "right"
    document_prompt: str = ""
    append_eos: bool = False
    cache_dtype: str = "float16"
    lora_targets: Optional[tuple[str, ...]] = None

    def to_json(self) -> dict:
        out = {"family": self.family, "pooling": self.pooling, "padding_side": self.padding_side,
               "document_prompt": self.document_prompt, "append_eos": self.append_eos,
               "cache_dtype": self.cache_dtype}
        if self.lora_targets:
            out["lora_targets"] = list(self.lora_targets)
        return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_decoder_config(config: Any) -> bool:
    if getattr(config, "is_decoder", False):
        return True
    if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or ())):
        return True
    return getattr(config, "model_type", "") in DECODER_TYPES


def read_spec(folder: Path, config: Any) -> EncoderSpec:
    """The folder's ``EncoderSpec``: ``recstream.json`` first, then sentence-transformers files, then the config."""
    own = _read_json(folder / "recstream.json")
    family = own.get("family") or getattr(config, "recstream_family", None)
    if family is None:
        family = "decoder" if is_decoder_config(config) else "encoder"
    if family not in ("encoder", "decoder"):
        raise ModelLoadError(f"{folder}/recstream.json: family must be 'encoder' or 'decoder', not {family!r}")
    spec = EncoderSpec(family=family, pooling="last_token" if family == "decoder" else "mean",
                       padding_side="left" if family == "decoder" else "right",
                       cache_dtype="bfloat16" if family == "decoder" else "float16")
    st_pooling = _read_json(folder / "1_Pooling" / "config.json")
    if st_pooling.get("pooling_mode_lasttoken"):
        spec = replace(spec, pooling="last_token")
    elif st_pooling.get("pooling_mode_cls_token"):
        spec = replace(spec, pooling="cls")
    elif st_pooling.get("pooling_mode_mean_tokens"):
        spec = replace(spec, pooling="mean")
    prompts = _read_json(folder / "config_sentence_transformers.json").get("prompts") or {}
    for key in _PROMPT_KEYS:
        if isinstance(prompts.get(key), str):
            spec = replace(spec, document_prompt=prompts[key])
            break
    pooling = own.get("pooling") or getattr(config, "recstream_pooling", None)
    if pooling is not None:
        spec = replace(spec, pooling=pooling)
    for key in ("padding_side", "document_prompt", "cache_dtype"):
        if key in own:
            spec = replace(spec, **{key: str(own[key])})
    if "append_eos" in own:
        spec = replace(spec, append_eos=bool(own["append_eos"]))
    if own.get("lora_targets"):
        spec = replace(spec, lora_targets=tuple(own["lora_targets"]))
    if spec.pooling not in POOLINGS:
        raise ModelLoadError(f"{folder}: pooling {spec.pooling!r} is not one of {', '.join(POOLINGS)}")
    if spec.padding_side not in ("left", "right"):
        raise ModelLoadError(f"{folder}: padding_side must be 'left' or 'right', not {spec.padding_side!r}")
    if spec.cache_dtype not in CACHE_DTYPES:
        raise ModelLoadError(f"{folder}: cache_dtype must be one of {', '.join(CACHE_DTYPES)}")
    if spec.family == "encoder" and spec.padding_side == "left":
        raise ModelLoadError(f"{folder}: encoder models with absolute positions need right padding")
    return spec


def load_hf_folder(path: str) -> tuple[Any, nn.Module, EncoderSpec]:
    """Tokenizer, base model (fp32) and spec of a local folder, offline.

    A peft adapter folder (``adapter_config.json``) is loaded onto its base
    model and merged.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(path)
    try:
        with no_weight_loading_bar():
            if (folder / "adapter_config.json").is_file():
                from peft import PeftConfig, PeftModel

                base_path = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
                if not base_path or not Path(base_path).is_dir():
                    raise ModelLoadError(f"{path}: the adapter's base model folder {base_path!r} is not here")
                _, base, base_spec = load_hf_folder(base_path)
                model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
                tok_path = folder if (folder / "tokenizer_config.json").is_file() else Path(base_path)
                tokenizer = AutoTokenizer.from_pretrained(str(tok_path), local_files_only=True)
                spec = read_spec(folder, model.config) if (folder / "recstream.json").is_file() else base_spec
            else:
                config = AutoConfig.from_pretrained(path, local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True).float()
                spec = read_spec(folder, config)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a Hugging Face model from {path!r}: {exc}") from exc
    tokenizer.padding_side = spec.padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if spec.append_eos and tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{path}: append_eos is set but the tokenizer has no EOS token")
    return tokenizer, model, spec
