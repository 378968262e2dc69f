"""Putting a verified checkpoint back: decode its files, then restore every part of a learner exactly."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from torch import nn

from learners.statistics import item_evidence
from learners.state.catalogue import Catalogue
from learners.checkpoint.manifest import FORMAT, TornCheckpoint
from learners.errors import CheckpointError
from learners.towers.optim import grown_rows
from learners.state.stream_state import StreamState

if TYPE_CHECKING:  # pragma: no cover
    from learners.learner import ContinualRecommender

log = logging.getLogger(__name__)


def parse(blobs: dict[str, bytes]) -> dict:
    """Decode every file (no learner touched yet); undecodable content is torn."""
    try:
        out = {name: json.loads(data) if name.endswith(".json") else st_load(data)
               for name, data in blobs.items() if name.endswith((".json", ".safetensors"))}
    except Exception as exc:  # noqa: BLE001 - hashes matched, so this is a writer bug or foreign folder
        raise TornCheckpoint(f"cannot decode its files ({exc!r})") from exc
    if int(out["state.json"].get("format", 0)) > FORMAT:
        raise CheckpointError("checkpoint written by a newer recstream; upgrade, or start with a fresh --state-dir")
    return out


def apply(data: dict, learner: "ContinualRecommender") -> None:
    """Put a parsed checkpoint into ``learner`` (same config, freshly built or not)."""
    state, model, parts, device = data["state.json"], learner.model, learner.parts, learner.device

    # Catalogue and cached text features (frozen bottom states are never re-encoded).
    learner.catalogue = Catalogue.from_state(data["catalogue.json"])
    features, saved = learner.features, data["features.safetensors"]
    lengths = saved["frozen_lengths"].tolist()
    present = [n for n in lengths if n >= 0]
    pieces = iter(torch.split(saved["frozen_data"], present) if present else ())
    pooled_kind = state["features"]["kind"] == "pooled"
    frozen = []
    for n in lengths:
        if n < 0:
            frozen.append(None)
        else:
            piece = next(pieces)
            frozen.append(piece[0] if pooled_kind else piece)
    features.frozen = frozen
    features.pooled = saved["pooled"].float().clone()
    features.has_text = saved["has_text"].clone()

    # The module: id tables take the saved capacity, then a strict load.
    tensors = data["learner.safetensors"]
    if "evidence" not in tensors:  # written before the items' evidence was kept: it starts empty
        tensors = {**tensors, "evidence": item_evidence.empty(tensors["popularity"].shape[0])}
    # An older layout's events count as credible.
    tensors = {**tensors, "evidence": item_evidence.with_credible(tensors["evidence"])}
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name in params and params[name].shape != value.shape and "." not in name:
            setattr(model, name, nn.Parameter(torch.empty(value.shape, dtype=params[name].dtype,
                                                          device=params[name].device),
                                              requires_grad=params[name].requires_grad))
    model.load_state_dict(tensors, strict=True)
    model.n_items = int(state["n_items"])

    # Optimizer: rebuild parameter groups by name, then per-parameter state.
    _load_optimizer(parts, model, state["optimizer"], data["optimizer.safetensors"])

    if learner.average is not None:  # absent: the average starts again from the live weights
        learner.average.load_state(data.get("serving_average.safetensors") or {}, device)

    if parts.ewc is not None:
        ewc_tensors = data.get("ewc.safetensors")
        if ewc_tensors is not None:
            parts.ewc.importance.clear()
            parts.ewc.anchor.clear()
            parts.ewc.load_state({k: v.to(device) for k, v in ewc_tensors.items()})
            parts.ewc.fit(model)  # id-table state was saved up to n_items (collect.py)
            parts.ewc.last_penalty = float((state.get("ewc") or {}).get("last_penalty", 0.0))
        else:
            log.warning("checkpoint has no EWC state (it was written with another strategy): EWC starts empty")

    if parts.replay is not None:
        replay = data.get("replay.safetensors")
        if replay is not None:  # older checkpoints also hold "reservoir_weights": not needed any more
            seen = (state.get("replay") or {}).get("seen_samples")
            parts.replay.storage_policy.load(replay["hist_rows"], replay["hist_weights"], replay["item_rows"], seen,
                                             owners=replay.get("owners"))
        else:
            log.warning("checkpoint has no replay buffer (it was written with another strategy): replay starts empty")

    if learner.item_item is not None:  # absent: no fit yet when it was written
        learner.item_item.load_state(data.get("item_item.safetensors") or {})

    users, user_meta = data["users.safetensors"], data["users.json"]
    learner.users.load_state({**user_meta, **{k: v.numpy() for k, v in users.items()}})

    tables = data["state.safetensors"]
    learner.restore(StreamState(
        model_version=int(state["model_version"]), event_seq=int(state["event_seq"]),
        pending=tables["pending"].tolist(), published=tables["published"].numpy(),
        refresh_cursor=int(state["refresh_cursor"]), samples_shed=int(state.get("samples_shed", 0))))
    stats = parts.stats
    for key, value in state.get("stats", {}).items():
        setattr(stats, key, value)

    torch.set_rng_state(tables["rng_cpu"])
    if "rng_cuda" in tables and device.type == "cuda":
        torch.cuda.set_rng_state(tables["rng_cuda"], device)


def _load_optimizer(parts, model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    optimizer, strategy = parts.strategy.optimizer, parts.strategy
    named = dict(model.named_parameters())
    groups = meta["groups"]
    wanted = [n for names in groups for n in names]
    if len(groups) != len(optimizer.param_groups) or len(set(wanted)) != len(wanted) \
            or any(n not in named for n in wanted):
        log.warning("optimizer parameters differ from the checkpoint's: optimizer state starts fresh")
        groups = [[n for n, p in named.items() if p.requires_grad]] if len(optimizer.param_groups) == 1 else None
        tensors, scalars = {}, {}
    else:
        scalars = meta.get("scalars", {})
    if groups is not None:
        for group, names in zip(optimizer.param_groups, groups):
            group["params"] = [named[n] for n in names]
    optimizer.state.clear()
    per_param: dict[str, dict] = {}
    for key, value in [*tensors.items(), *scalars.items()]:
        name, _, field = key.rpartition("/")
        per_param.setdefault(name, {})[field] = value
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, fields in per_param.items():
        param = named[name]
        group = group_of.get(id(param), {})
        on_device = bool(group.get("capturable") or group.get("fused"))
        optimizer.state[param] = {
            field: (value.to(param.device, dtype=param.dtype if value.is_floating_point() else value.dtype)
                    if torch.is_tensor(value) and (value.dim() > 0 or on_device) else value)
            for field, value in fields.items()}
        for field, value in optimizer.state[param].items():  # moments saved up to n_items (collect.py)
            if torch.is_tensor(value) and value.dim() == 2 and value.shape[0] < param.shape[0]:
                optimizer.state[param][field] = grown_rows(value, param)
    # Avalanche maps parameters by name from here on (no reset on the next experience).
    strategy.optimized_param_id = dict(named)

