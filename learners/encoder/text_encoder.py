"""``TextEncoder``: tokenises item texts and runs the frozen bottom whose outputs the catalogue caches.

The bottom layers never change, so their output for an item text is computed
once and cached (exact up to the cache dtype); training and re-embedding only
run the trainable ``top`` over those cached states. ``check_split`` proves on
load that cached bottom + top reproduces the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from learners.encoder.layers import encoder_layers
from learners.encoder.model_folder import load_hf_folder
from learners.encoder.pooling import pool, position_ids_from_mask
from learners.encoder.precision import as_dtype, bf16_autocast
from learners.encoder.top_layers import TopLayers
from learners.encoder.train_params import (DEFAULT_LORA_TARGETS, build_top, check_train_params,
                                           resolve_train_layers)
from learners.errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from learners.config import LearnerConfig

_PROBE_TEXTS = ("a short probe", "a somewhat longer probe text for the split check of the encoder")


class TextEncoder:
    """Tokenises texts and runs the frozen bottom; owns the trainable ``top`` module."""

    def __init__(self, path: str, train_layers: int, max_tokens: int, device: torch.device, *,
                 train_params: str = "top", lora_rank: int = 8, lora_alpha: float = 16.0,
                 lora_targets: Optional[Sequence[str]] = None, gradient_checkpointing: bool = False,
                 cache_dtype: Optional[torch.dtype | str] = None, check_split: bool = True) -> None:
        check_train_params(train_params)
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
        self.cache_dtype = as_dtype(cache_dtype or self.spec.cache_dtype)
        self.train_params = train_params
        self.lora_rank, self.lora_alpha = int(lora_rank), float(lora_alpha)
        self.lora_targets = tuple(lora_targets or self.spec.lora_targets or DEFAULT_LORA_TARGETS[self.family])
        self.gradient_checkpointing = gradient_checkpointing
        self.mixed_precision = True  # bf16 autocast for the frozen bottom on CUDA
        n_layers = self.num_layers() if (train_layers or train_params == "full") else 0
        self.train_layers = resolve_train_layers(train_layers, n_layers, train_params)
        self.top = build_top(self.model, family=self.family, pooling=self.pooling, train_layers=self.train_layers,
                             train_params=self.train_params, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                             lora_targets=self.lora_targets, gradient_checkpointing=self.gradient_checkpointing)
        self.top.to(self.device)
        if check_split and self.train_layers:
            self.check_split()

    @classmethod
    def from_config(cls, config: "LearnerConfig", device: torch.device) -> "TextEncoder":
        return cls(config.model_path, config.train_layers, config.max_text_tokens, device,
                   train_params=config.train_params, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                   lora_targets=config.lora_targets, gradient_checkpointing=config.gradient_checkpointing)

    # -- structure ---------------------------------------------------------------------------------
    def num_layers(self) -> int:
        return len(encoder_layers(self.model))

    @property
    def bottom_layers(self) -> int:
        return self.num_layers() - self.train_layers if self.train_layers else self.num_layers()

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
            with bf16_autocast(self.device, self.mixed_precision):
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
            with bf16_autocast(self.device, self.mixed_precision):
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
