"""Which settings a checkpoint can be loaded across, and refusing the ones it cannot."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from learners.checkpoint.collect import compact_json
from learners.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from learners.learner import ContinualRecommender

log = logging.getLogger(__name__)

# Settings a checkpoint cannot be loaded across: tensor shapes or cached features would not fit.
MUST_MATCH = ("model_path", "vector_dim", "item_item_dims", "history_length", "train_layers", "train_params")
LORA_MUST_MATCH = ("lora_rank", "lora_alpha", "lora_targets")
# Every checkpoint of today's vector layout records this setting. One without it was written before
# the trending coordinate (learners.statistics.trending) took a coordinate from the model: its tensors do not fit.
LAYOUT_MARK = "trending_weight"


def _normalised_path(value: Any) -> str:
    return os.path.realpath(os.path.expanduser(str(value)))


def check_config(saved: dict, learner: "ContinualRecommender", path: Path) -> None:
    """Raise ``CheckpointError`` when ``saved`` differs from the learner's config in a must-match setting."""
    if LAYOUT_MARK not in saved:
        raise CheckpointError(
            f"checkpoint {path} was written by an older recstream whose vectors have another layout (no "
            f"trending coordinate); it cannot be loaded. Start with a fresh --state-dir (or move {path.parent} "
            f"away)")
    # Through JSON, as saved (tuples become lists); keys an older checkpoint lacks take today's defaults.
    current = json.loads(compact_json(asdict(learner.config)))
    defaults = json.loads(compact_json({f.name: f.default for f in fields(learner.config) if f.default is not MISSING}))
    saved = {**defaults, **saved}
    must = list(MUST_MATCH)
    if "lora" in (saved.get("train_params"), current.get("train_params")):
        must += LORA_MUST_MATCH
    differ = []
    for key in must:
        old, new = saved.get(key), current.get(key)
        same = _normalised_path(old) == _normalised_path(new) if key == "model_path" else old == new
        if not same:
            differ.append(f"{key} {old!r} (now {new!r})")
    if differ:
        raise CheckpointError(
            f"checkpoint {path} was written with {', '.join(differ)}; it cannot be loaded with these settings. "
            f"Start with a fresh --state-dir (or move {path.parent} away), or run with the checkpoint's settings")
    changed = sorted(k for k in current if k in saved and saved[k] != current[k] and k not in must)
    if changed:
        log.info("settings changed since checkpoint %s: %s", path.name,
                 ", ".join(f"{k} {saved[k]!r} -> {current[k]!r}" for k in changed))
