"""A Hugging Face text encoder split into a frozen bottom and a trainable top.

The bottom layers never change, so their output for an item text is computed
once and cached (exact). Training and re-embedding only run the top
``train_layers`` layers over the cached token states, which is what makes
fine-tuning affordable on a CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from learners.errors import ModelLoadError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is visible; use --device auto or cpu")
    return torch.device(device)


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer layers of a BERT-style encoder."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    raise ModelLoadError(
        f"{type(model).__name__}: cannot find its transformer layers (model.encoder.layer); "
        "use --train-layers 0 for this model")


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TextEncoder:
    """Tokenises texts and runs the frozen bottom; owns the trainable ``top`` module."""

    def __init__(self, path: str, train_layers: int, max_tokens: int, device: torch.device) -> None:
        from transformers import AutoModel, AutoTokenizer

        if not Path(path).is_dir():
            raise ModelLoadError(f"model folder {path!r} does not exist; pass --model with a local Hugging Face model folder")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load a Hugging Face model from {path!r}: {exc}") from exc
        self.path = path
        self.device = device
        self.max_tokens = max_tokens
        self.hidden_size = int(self.model.config.hidden_size)
        self.model.to(device).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train_layers = train_layers
        self.top = TopLayers(_encoder_layers(self.model)[-train_layers:] if train_layers else None)
        self.top.to(device)

    @torch.no_grad()
    def frozen_features(self, texts: Sequence[str], batch_size: int = 128) -> list[torch.Tensor]:
        """Per text: bottom-layer token states [tokens, hidden] (fp16, CPU), or the
        pooled vector [hidden] when nothing is trained."""
        out: list[torch.Tensor] = []
        bottom = len(_encoder_layers(self.model)) - self.train_layers if self.train_layers else None
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt").to(self.device)
            result = self.model(**batch, output_hidden_states=bottom is not None)
            mask = batch["attention_mask"]
            if bottom is None:
                pooled = mean_pool(result.last_hidden_state, mask).float().cpu()
                out.extend(pooled)
            else:
                states = result.hidden_states[bottom].to(torch.float16).cpu()
                lengths = mask.sum(1).tolist()
                out.extend(states[i, :n].clone() for i, n in enumerate(lengths))
        return out


    @torch.no_grad()
    def pooled(self, texts: Sequence[str], batch_size: int = 128) -> "np.ndarray":
        """The pretrained model's mean-pooled text vectors, as shipped (no cache, no training)."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt").to(self.device)
            result = self.model(**batch)
            out.append(mean_pool(result.last_hidden_state, batch["attention_mask"]).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.hidden_size), np.float32)


class TopLayers(nn.Module):
    """The trainable top of the encoder: layers over cached token states, then mean pooling."""

    def __init__(self, layers: nn.ModuleList | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(list(layers)) if layers is not None else None
        if self.layers is not None:
            for param in self.layers.parameters():
                param.requires_grad_(True)

    @property
    def trainable(self) -> bool:
        return self.layers is not None

    def forward(self, features: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        if self.layers is None:
            return torch.stack(features).to(device)
        states = nn.utils.rnn.pad_sequence(features, batch_first=True).to(device=device, dtype=torch.float32)
        lengths = torch.tensor([f.shape[0] for f in features], device=device)
        mask = (torch.arange(states.shape[1], device=device)[None, :] < lengths[:, None])
        additive = (~mask)[:, None, None, :].to(states.dtype) * torch.finfo(states.dtype).min
        for layer in self.layers:
            out = layer(states, attention_mask=additive)
            states = out[0] if isinstance(out, tuple) else out
        return mean_pool(states, mask)
