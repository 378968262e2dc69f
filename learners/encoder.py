"""A Hugging Face text encoder split into a frozen bottom and a trainable top.

The bottom layers never change, so their output for an item text is computed
once and cached (exact up to the cache dtype). Training and re-embedding only
run the top ``train_layers`` layers over the cached token states, which is
what makes fine-tuning affordable on a CPU.

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
``learners.adapters.export_model`` (a merged model, or a peft adapter folder
whose ``adapter_config.json`` names the base model) loads here as well.

What is trained (``train_params``):

``top``   the top ``train_layers`` layers (plus a decoder's final norm), fully.
``lora``  LoRA adapters (peft) on the target modules of the top ``train_layers``
          layers; nothing else of the encoder is trainable.
``full``  every transformer layer (plus the final norm); only the embeddings
          stay frozen, and their output is what gets cached.

On CUDA the trainable top runs under bf16 autocast (parameters stay fp32)
and can use gradient checkpointing; on CPU everything is fp32.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from learners.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

TRAIN_PARAMS = ("top", "lora", "full")
POOLINGS = ("mean", "cls", "last_token")
DECODER_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi3", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "cohere", "glm",
    "ministral", "smollm3", "internlm2", "exaone", "helium",
})
DEFAULT_LORA_TARGETS = {"encoder": ("query", "value"), "decoder": ("q_proj", "v_proj")}
_CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_PROMPT_KEYS = ("document", "passage", "doc", "corpus")
_PROBE_TEXTS = ("a short probe", "a somewhat longer probe text for the split check of the encoder")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is visible; use --device auto or cpu")
    return torch.device(device)


# -- what the model folder says --------------------------------------------------------------------

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
    if spec.cache_dtype not in _CACHE_DTYPES:
        raise ModelLoadError(f"{folder}: cache_dtype must be one of {', '.join(_CACHE_DTYPES)}")
    if spec.family == "encoder" and spec.padding_side == "left":
        raise ModelLoadError(f"{folder}: encoder models with absolute positions need right padding")
    return spec


# -- where the layers are ---------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # a peft PeftModel
    return get_base() if callable(get_base) else model


def _layer_path(model: nn.Module) -> str:
    model = _unwrap(model)
    for path in ("encoder.layer", "layers", "model.layers", "model.encoder.layer"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return path
    raise ModelLoadError(
        f"{type(model).__name__}: cannot find its transformer layers (encoder.layer or layers); "
        "use --train-layers 0 for this model")


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of the model (BERT ``encoder.layer`` or decoder ``layers``)."""
    obj = _unwrap(model)
    for part in _layer_path(model).split("."):
        obj = getattr(obj, part)
    return obj


def _decoder_parts(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """A decoder's final norm and its shared rotary embedding (None in old transformers versions)."""
    model = _unwrap(model)
    owner = getattr(model, "model", model) if not hasattr(model, "layers") else model
    norm = next((getattr(owner, n) for n in ("norm", "final_layernorm", "final_layer_norm")
                 if isinstance(getattr(owner, n, None), nn.Module)), None)
    if norm is None:
        raise ModelLoadError(f"{type(model).__name__}: cannot find the final norm (model.norm) of this decoder; "
                             "use --train-layers 0 for this model")
    return norm, getattr(owner, "rotary_emb", None)


# -- pooling and masks ------------------------------------------------------------------------------

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
_MASKED = float(torch.finfo(torch.bfloat16).min)


def _additive_mask(mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
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
    return out.masked_fill_(~allowed, _MASKED)


# -- the trainable top ------------------------------------------------------------------------------

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

    def _autocast(self, device: torch.device):
        enabled = self.mixed_precision and device.type == "cuda"
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)

    def forward(self, features: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        if self.layers is None:
            return torch.stack([f.to(torch.float32) for f in features]).to(device)
        states = nn.utils.rnn.pad_sequence([f.to(torch.float32) for f in features], batch_first=True).to(device)
        lengths = torch.tensor([f.shape[0] for f in features], device=device)
        mask = torch.arange(states.shape[1], device=device)[None, :] < lengths[:, None]
        with self._autocast(device):
            states = self.run(states, mask)
        return pool(states.float(), mask, self.pooling)

    def run(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Top layers (and a decoder's final norm) over padded bottom states [n, tokens, hidden]."""
        decoder = self.family == "decoder"
        if decoder:
            attn = _additive_mask(mask, causal=True, dtype=states.dtype)
            position_ids = position_ids_from_mask(mask)
            kwargs: dict = {"position_ids": position_ids}
            if self.rotary is not None:
                kwargs["position_embeddings"] = self.rotary(states, position_ids)
        else:
            attn = (~mask)[:, None, None, :].to(states.dtype) * _MASKED
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


# -- the encoder ------------------------------------------------------------------------------------

class TextEncoder:
    """Tokenises texts and runs the frozen bottom; owns the trainable ``top`` module."""

    def __init__(self, path: str, train_layers: int, max_tokens: int, device: torch.device, *,
                 train_params: str = "top", lora_rank: int = 8, lora_alpha: float = 16.0,
                 lora_targets: Optional[Sequence[str]] = None, gradient_checkpointing: bool = False,
                 cache_dtype: Optional[torch.dtype | str] = None, check_split: bool = True) -> None:
        if train_params not in TRAIN_PARAMS:
            raise ConfigError(f"train_params must be one of {', '.join(TRAIN_PARAMS)}, not {train_params!r}")
        if not Path(path).is_dir():
            raise ModelLoadError(f"model folder {path!r} does not exist; pass --model with a local Hugging Face model folder")
        self.path = str(path)
        self.device = torch.device(device) if isinstance(device, str) else device
        self.max_tokens = max_tokens
        self.tokenizer, self.model, self.spec = load_hf_folder(self.path)
        self.family = self.spec.family
        self.pooling = self.spec.pooling
        self.hidden_size = int(self.model.config.hidden_size)
        self.model.to(self.device).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.cache_dtype = _as_dtype(cache_dtype or self.spec.cache_dtype)
        self.train_params = train_params
        self.lora_rank, self.lora_alpha = int(lora_rank), float(lora_alpha)
        self.lora_targets = tuple(lora_targets or self.spec.lora_targets or DEFAULT_LORA_TARGETS[self.family])
        self.gradient_checkpointing = gradient_checkpointing
        self.mixed_precision = True  # bf16 autocast for the frozen bottom on CUDA
        n_layers = self.num_layers() if (train_layers or train_params == "full") else 0
        if train_params == "full":
            train_layers = n_layers
        elif train_layers > n_layers:
            log.warning("--train-layers %d but the model has %d layers: training all of them", train_layers, n_layers)
            train_layers = n_layers
        self.train_layers = int(train_layers)
        self.top = self._build_top()
        self.top.to(self.device)
        if check_split and self.train_layers:
            self.check_split()

    @classmethod
    def from_config(cls, config: Any, device: torch.device) -> "TextEncoder":
        """From a ``LearnerConfig`` (or anything with its field names)."""
        targets = getattr(config, "lora_targets", None)
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return cls(config.model_path, config.train_layers, config.max_text_tokens, device,
                   train_params=getattr(config, "train_params", "top"),
                   lora_rank=getattr(config, "lora_rank", 8), lora_alpha=getattr(config, "lora_alpha", 16.0),
                   lora_targets=targets or None,
                   gradient_checkpointing=getattr(config, "gradient_checkpointing", False))

    # -- structure ---------------------------------------------------------------------------------
    def num_layers(self) -> int:
        return len(_encoder_layers(self.model))

    @property
    def bottom_layers(self) -> int:
        return self.num_layers() - self.train_layers if self.train_layers else self.num_layers()

    def _build_top(self) -> TopLayers:
        if not self.train_layers:
            return TopLayers(None, family=self.family, pooling=self.pooling)
        layers = list(_encoder_layers(self.model)[-self.train_layers:])
        norm = rotary = None
        if self.family == "decoder":
            norm, rotary = _decoder_parts(self.model)
        if self.train_params == "lora":
            from learners.adapters import add_lora

            # A copy sharing the frozen weights: the base model itself stays as shipped.
            memo = {id(p): p for p in self.model.parameters()}
            memo.update({id(b): b for b in self.model.buffers()})
            layers = copy.deepcopy(nn.ModuleList(layers), memo)
            add_lora(layers, rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)
        return TopLayers(layers, family=self.family, pooling=self.pooling, norm=norm, rotary=rotary,
                         train_params=self.train_params, gradient_checkpointing=self.gradient_checkpointing)

    # -- tokenising --------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict:
        """Padded batch (the family's padding side) of prompt + text, truncated, EOS appended if asked."""
        texts = [self.spec.document_prompt + t for t in texts]
        tok = self.tokenizer
        if not self.spec.append_eos:
            return tok(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        enc = tok(texts, truncation=True, max_length=max(1, self.max_tokens - 1), padding=False)
        eos = tok.eos_token_id
        for i, ids in enumerate(enc["input_ids"]):
            if ids[-1:] == [eos]:
                continue
            for key in list(enc.keys()):
                row = enc[key][i]
                row.append(eos if key == "input_ids" else 1 if key == "attention_mask" else row[-1] if row else 0)
        return tok.pad(enc, padding=True, return_tensors="pt")

    def _model_inputs(self, batch: dict) -> dict:
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        if self.family == "decoder":
            inputs.pop("token_type_ids", None)
            inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
            inputs["use_cache"] = False
        return inputs

    def _autocast(self):
        enabled = self.mixed_precision and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # -- frozen features ---------------------------------------------------------------------------
    @torch.no_grad()
    def bottom_states(self, texts: Sequence[str], dtype: Optional[torch.dtype] = None,
                      batch_size: int = 128) -> list[torch.Tensor]:
        """Per text, the unpadded token states after the frozen bottom [tokens, hidden] (CPU)."""
        dtype = dtype or self.cache_dtype
        bottom = self.bottom_layers
        self.model.eval()  # frozen: always eval (a "top" TopLayers shares its layers)
        out: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            inputs = self._model_inputs(self.tokenize(list(texts[start:start + batch_size])))
            with self._autocast():
                result = self.model(**inputs, output_hidden_states=True)
            states = result.hidden_states[bottom].to(dtype).cpu()
            mask = inputs["attention_mask"].bool().cpu()
            out.extend(states[i][mask[i]].clone() for i in range(len(states)))
        return out

    @torch.no_grad()
    def frozen_features(self, texts: Sequence[str], batch_size: int = 128) -> list[torch.Tensor]:
        """Per text: bottom-layer token states [tokens, hidden] (``cache_dtype``, CPU), or the
        pooled vector [hidden] (fp32) when nothing is trained."""
        if not self.train_layers:
            return list(torch.from_numpy(self.pooled(texts, batch_size)))
        return self.bottom_states(texts, batch_size=batch_size)

    @torch.no_grad()
    def pooled(self, texts: Sequence[str], batch_size: int = 128) -> "np.ndarray":
        """The pretrained model's pooled text vectors, as shipped (no cache, no training)."""
        self.model.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            inputs = self._model_inputs(self.tokenize(list(texts[start:start + batch_size])))
            with self._autocast():
                result = self.model(**inputs)
            out.append(pool(result.last_hidden_state.float(), inputs["attention_mask"], self.pooling).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.hidden_size), np.float32)

    @torch.no_grad()
    def top_pooled(self, texts: Sequence[str], top: Optional[TopLayers] = None) -> "np.ndarray":
        """Pooled vectors of texts through a (trained) ``top`` over exact fp32 bottom states."""
        top = top or self.top
        was_training = top.training
        top.eval()
        try:
            if not top.trainable:
                return self.pooled(texts)
            return top(self.bottom_states(texts, dtype=torch.float32), self.device).cpu().numpy()
        finally:
            top.train(was_training)

    def check_split(self, tolerance: float = 1e-3) -> float:
        """Cached bottom + top must reproduce the full model; a model whose layers need
        more than we pass (relative position bias, several rotary tables) fails here.
        Returns the relative error (fp32 throughout)."""
        mixed = self.mixed_precision, self.top.mixed_precision
        self.mixed_precision = self.top.mixed_precision = False
        try:
            texts = list(_PROBE_TEXTS)
            split = self.top_pooled(texts)
            whole = self.pooled(texts)
        finally:
            self.mixed_precision, self.top.mixed_precision = mixed
        err = float(np.abs(split - whole).max() / max(float(np.abs(whole).max()), 1e-6))
        if not np.isfinite(err) or err > tolerance:
            raise ModelLoadError(
                f"{self.path}: the trainable top layers do not reproduce {type(self.model).__name__}'s output "
                f"(relative error {err:.2e}); this architecture is not supported with --train-layers > 0")
        return err


def _as_dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in _CACHE_DTYPES:
        raise ConfigError(f"cache dtype must be one of {', '.join(_CACHE_DTYPES)}, not {value!r}")
    return _CACHE_DTYPES[value]


def load_hf_folder(path: str) -> tuple[Any, nn.Module, EncoderSpec]:
    """Tokenizer, base model (fp32) and spec of a local folder, offline.

    A peft adapter folder (``adapter_config.json``) is loaded onto its base
    model and merged.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(path)
    try:
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


__all__ = ["TextEncoder", "TopLayers", "EncoderSpec", "read_spec", "resolve_device", "mean_pool",
           "last_token_pool", "pool", "TRAIN_PARAMS", "DECODER_TYPES", "DEFAULT_LORA_TARGETS"]
