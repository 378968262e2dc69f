"""Which device the encoder runs on and at what precision: bf16 autocast on CUDA, cache dtypes."""

from __future__ import annotations

import torch

from learners.errors import ConfigError, ModelLoadError

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is visible; use --device auto or cpu")
    return torch.device(device)


def as_dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in CACHE_DTYPES:
        raise ConfigError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, not {value!r}")
    return CACHE_DTYPES[value]


def bf16_autocast(device: torch.device, enabled: bool):
    """bf16 autocast when asked for and on CUDA; a no-op context on CPU (fp32 there)."""
    enabled = enabled and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
