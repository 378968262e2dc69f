"""What goes into a checkpoint: a learner's whole state as file contents, and its encoder as a HF folder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from safetensors.torch import save as st_save

from learners.checkpoint.atomic import fsync_path
from learners.checkpoint.manifest import FORMAT, hash_file
from learners.checkpoint.export import FROZEN_SHARD, export_model

if TYPE_CHECKING:  # pragma: no cover
    from learners.learner import ContinualRecommender


def compact_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _tensors(items: dict) -> bytes:
    return st_save({k: _cpu(v) for k, v in items.items()})


def _cpu(value) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    return tensor.detach().to("cpu").contiguous()


def collect(learner: "ContinualRecommender", extra_bytes: bytes) -> dict[str, bytes]:
    """Every file of a checkpoint except ``model/`` and the manifest, as bytes."""
    model, parts = learner.model, learner.parts
    out: dict[str, bytes] = {"config.json": compact_json(asdict(learner.config)), "extra.json": extra_bytes}

    # The module's own parameters; id tables are saved at full capacity (exact shapes).
    out["learner.safetensors"] = _tensors(dict(model.state_dict()))

    # Id tables have spare rows past the catalogue (``TwoTower.grow`` doubles them). No step
    # reaches those rows, so their Adam moments and EWC importances are zero and their EWC
    # anchors equal the weights: saved up to ``n_items`` only, and padded back exactly on
    # restore (``RowSparseAdam`` and ``OnlineFisherEWC`` grow state to a grown table).
    used = {name: int(model.n_items) for name in getattr(model, "row_sparse_params", ())}

    def used_rows(name: str, value):
        n = used.get(name)
        return value[:n] if n is not None and torch.is_tensor(value) and value.dim() == 2 else value

    # Optimizer state keyed by parameter *name*: Avalanche re-registers parameters
    # (and grown tables replace Parameter objects), so positions are not stable.
    optimizer = parts.strategy.optimizer
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups, opt_tensors, opt_scalars = [], {}, {}
    for group in optimizer.param_groups:
        names = [name_of[id(p)] for p in group["params"] if id(p) in name_of]
        groups.append(names)
        for param in group["params"]:
            name = name_of.get(id(param))
            for key, value in (optimizer.state.get(param) or {}).items() if name else ():
                if torch.is_tensor(value):
                    opt_tensors[f"{name}/{key}"] = used_rows(name, value)
                else:
                    opt_scalars[f"{name}/{key}"] = value
    out["optimizer.safetensors"] = _tensors(opt_tensors)

    if parts.ewc is not None:
        out["ewc.safetensors"] = _tensors({key: used_rows(key.partition("/")[2], value)
                                           for key, value in parts.ewc.state().items()})
    if learner.average is not None and learner.average.shadow:
        out["serving_average.safetensors"] = _tensors(learner.average.state())

    replay_meta = None
    if parts.replay is not None:
        policy = parts.replay.storage_policy
        rows, weights, items = policy.tensors()
        out["replay.safetensors"] = _tensors({"hist_rows": rows, "hist_weights": weights, "item_rows": items,
                                              "owners": policy.owners()})
        replay_meta = {"samples": int(len(items)), "seen_samples": int(policy.seen_samples)}

    if learner.item_item is not None and learner.item_item.state():
        out["item_item.safetensors"] = _tensors(learner.item_item.state())

    users = learner.users.state()
    # Arrays (rings, profiles) as tensors, the rest (ids, sizes, counters) as JSON.
    out["users.safetensors"] = _tensors({k: v for k, v in users.items() if isinstance(v, np.ndarray)})
    out["users.json"] = compact_json({k: v for k, v in users.items() if not isinstance(v, np.ndarray)})

    features = learner.features
    n_rows = len(features.frozen)
    present = [f for f in features.frozen if f is not None]
    kind = "tokens" if present and present[0].dim() == 2 else "pooled"
    dtype = present[0].dtype if present else torch.float16
    lengths = np.array([-1 if f is None else (f.shape[0] if f.dim() == 2 else 1) for f in features.frozen], np.int64)
    data = (torch.cat([f.reshape(-1, features.hidden_size).to(dtype) for f in present]) if present
            else torch.zeros(0, features.hidden_size, dtype=dtype))
    out["features.safetensors"] = _tensors({
        "frozen_data": data, "frozen_lengths": lengths,
        "pooled": features.pooled[:n_rows], "has_text": features.has_text[:n_rows]})
    out["catalogue.json"] = compact_json(learner.catalogue.state())

    stream = learner.snapshot()
    pending = np.array(stream.pending, dtype=np.int64).reshape(-1, 3)
    state_tensors = {"pending": pending, "published": np.asarray(stream.published, np.float32),
                     "rng_cpu": torch.get_rng_state()}
    if learner.device.type == "cuda":
        state_tensors["rng_cuda"] = torch.cuda.get_rng_state(learner.device)
    out["state.safetensors"] = _tensors(state_tensors)
    stats = parts.stats
    out["state.json"] = compact_json({
        "format": FORMAT,
        "model_version": stream.model_version,
        "event_seq": stream.event_seq,
        "refresh_cursor": stream.refresh_cursor,
        "samples_shed": stream.samples_shed,
        "n_items": int(model.n_items),
        "features": {"rows": n_rows, "kind": kind},
        "optimizer": {"groups": groups, "scalars": opt_scalars},
        "ewc": {"last_penalty": float(parts.ewc.last_penalty)} if parts.ewc is not None else None,
        "replay": replay_meta,
        "stats": {"steps": stats.steps, "samples": stats.samples, "seconds": stats.seconds,
                  "last_loss": stats.last_loss},
    })
    return out


def export_hf_model(learner: "ContinualRecommender", folder: Path,
                    frozen: Optional[tuple[Path, dict]] = None) -> dict[str, Optional[dict]]:
    """The encoder with the learner's trained layers merged in, as a Hugging Face folder.

    ``learners.checkpoint.export.export_model(merged=True, split=True)``: the base model's
    weights in a frozen and a trained shard, the tokenizer, ``recstream.json``
    and the base folder's sentence-transformers files. ``frozen``, the path and
    manifest entry of a frozen shard this learner's encoder wrote before, is
    hard-linked and not hashed again. Returns every file written, keyed
    ``model/...``: the linked shard with its manifest entry, the others with
    None, to be made durable and hashed by ``model_file_entries`` (which needs
    nothing of the learner, so it may run while the learner trains on).
    """
    export_model(learner, folder, merged=True, split=True, frozen_shard=frozen[0] if frozen else None)
    files: dict[str, Optional[dict]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        linked = frozen is not None and path.name == FROZEN_SHARD and _same_file(path, frozen[0])
        files[path.relative_to(folder.parent).as_posix()] = frozen[1] if linked else None
    return files


def model_file_entries(root: Path, files: dict[str, Optional[dict]]) -> dict[str, dict]:
    """fsync and hash the exported files under ``root`` that have no manifest entry yet."""
    out = {}
    for name, entry in files.items():
        if entry is None:
            path = root / name
            fsync_path(path)
            size, digest, _ = hash_file(path, keep=False)
            entry = {"size": size, "sha256": digest}
        out[name] = entry
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # the old shard was pruned meanwhile: this one was written, not linked
        return False
