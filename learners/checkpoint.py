"""Atomic checkpoint folders: tmp + fsync + rename, newest complete one wins.

Layout of ``state_dir``::

    ckpt-<model_version:012d>-<seq>/     one complete checkpoint
        MANIFEST.json          written last: size and sha256 of every other file
        config.json            the LearnerConfig it was written with
        state.json             scalars, optimizer parameter names, sizes
        state.safetensors      pending samples, published table, RNG states
        learner.safetensors    the TwoTower module's own state (projections,
                               id embeddings, global context, trained top layers)
        optimizer.safetensors  per-parameter optimizer state, keyed by parameter name
        ewc.safetensors        EWC importances and anchors (when EWC is on)
        replay.safetensors     replay buffer samples + reservoir weights (when replay is on)
        users.safetensors      user history rings;  users.json: user ids (LRU order)
        features.safetensors   cached frozen token states (concatenated + lengths),
                               pooled text features, has-text flags
        catalogue.json         item ids and texts
        extra.json             the caller's ``extra`` dict (Kafka offsets, ledger, ...)
        model/                 Hugging Face folder of the fine-tuned encoder, trained
                               layers merged in (``AutoModel.from_pretrained`` /
                               ``AutoTokenizer``; ``learners.adapters.export_model``)
    .tmp-<model_version>-<pid>/  a checkpoint being written (or a crashed writer's)

``seq`` is this store's save counter (one more than the highest on disk), so
two checkpoints of the same model version never collide and the highest
``seq`` is the newest. A checkpoint is built in the tmp folder, every file
and folder is fsynced, ``MANIFEST.json`` is written last and fsynced, then the
folder is renamed into place (the commit point) and ``state_dir`` is fsynced.
On load, a folder whose manifest is missing or invalid, or whose files do
not match it, is torn or corrupt: it is skipped with a WARNING and the
previous one is tried (``fallbacks`` counts them).

Everything a restarted learner needs is restored exactly, so a restored
learner publishes identical user and item vectors and goes on training where
the old one stopped (optimizer moments, EWC, replay buffer and RNG included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from learners.catalogue import Catalogue
from learners.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from learners.learner import ContinualRecommender

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "MANIFEST.json"
MODEL_DIR = "model"
# Settings a checkpoint cannot be loaded across: tensor shapes or cached features would not fit.
MUST_MATCH = ("model_path", "vector_dim", "history_length", "train_layers", "train_params")
LORA_MUST_MATCH = ("lora_rank", "lora_alpha", "lora_targets")
REQUIRED = ("config.json", "state.json", "state.safetensors", "learner.safetensors", "optimizer.safetensors",
            "users.safetensors", "users.json", "features.safetensors", "catalogue.json", "extra.json",
            f"{MODEL_DIR}/config.json")
_CKPT = re.compile(r"^ckpt-(\d+)-(\d+)$")
_TMP = re.compile(r"^\.tmp-(\d+)-(\d+)$")


class _Torn(Exception):
    """A checkpoint folder that cannot be used (reason in the message)."""


class CheckpointStore:
    """Saves and restores a ``ContinualRecommender`` plus the caller's ``extra`` dict."""

    def __init__(self, state_dir: os.PathLike | str, keep: int = 3) -> None:
        if keep < 1:
            raise CheckpointError(f"keep must be at least 1 (got {keep})")
        self.state_dir = Path(state_dir)
        self.keep = int(keep)
        self.fallbacks = 0  # torn/corrupt checkpoints skipped by the last load_latest
        self.last_path: Optional[Path] = None
        self.last_bytes = 0
        self.last_seconds = 0.0

    # -- listing ----------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Final-named checkpoint folders, newest first (complete or not)."""
        if not self.state_dir.is_dir():
            return []
        found = []
        for entry in self.state_dir.iterdir():
            match = _CKPT.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(2)), int(match.group(1)), entry))
        return [path for *_, path in sorted(found, reverse=True)]

    def _next_seq(self) -> int:
        seqs = [int(m.group(2)) for p in self.checkpoints() if (m := _CKPT.match(p.name))]
        return max(seqs, default=0) + 1

    # -- saving -----------------------------------------------------------------
    def save(self, learner: "ContinualRecommender", extra: Optional[dict] = None) -> Path:
        """Write a complete checkpoint atomically; returns its folder.

        Raises ``OSError`` (disk) or ``CheckpointError`` (anything else); a failed
        save leaves the previous checkpoints untouched.
        """
        started = time.perf_counter()
        try:
            extra_bytes = json.dumps(extra if extra is not None else {}, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint's extra dict is not JSON-serialisable: {exc}") from exc
        self.state_dir.mkdir(parents=True, exist_ok=True)
        version = int(learner.model_version)
        seq = self._next_seq()
        tmp = self.state_dir / f".tmp-{version}-{os.getpid()}"
        final = self.state_dir / f"ckpt-{version:012d}-{seq}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            files: dict[str, dict] = {}
            for name, data in _serialise(learner, extra_bytes).items():
                files[name] = _write(tmp / name, data)
            files.update(_export_hf_model(learner, tmp / MODEL_DIR))
            _fsync_tree(tmp)
            manifest = {"format": FORMAT, "model_version": version, "seq": seq, "created": time.time(),
                        "files": files, "files_sha256": _files_digest(files)}
            # Written last: its presence and validity is what makes the folder complete.
            _write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            _fsync_path(tmp)
            os.rename(tmp, final)
            _fsync_path(self.state_dir)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (OSError, CheckpointError)) or not isinstance(exc, Exception):
                raise
            raise CheckpointError(f"could not write a checkpoint to {self.state_dir}: {exc!r}") from exc
        self.last_path = final
        self.last_bytes = sum(f["size"] for f in files.values())
        try:
            self._prune(keep_path=final)
        except OSError as exc:  # the checkpoint itself is committed: pruning can wait for the next one
            log.warning("could not prune old checkpoints in %s: %s", self.state_dir, exc)
        self.last_seconds = time.perf_counter() - started
        log.info("checkpoint %s written: model version %d, %.1f MB in %.2f s",
                 final.name, version, self.last_bytes / 1e6, self.last_seconds)
        return final

    def _prune(self, keep_path: Path) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones and stale tmp folders."""
        kept = 0
        for path in self.checkpoints():
            complete = path == keep_path or _quick_check(path)
            if complete and kept < self.keep:
                kept += 1
                continue
            log.info("removing %s checkpoint %s", "old" if complete else "incomplete", path.name)
            shutil.rmtree(path, ignore_errors=True)
        for entry in self.state_dir.iterdir():
            match = _TMP.match(entry.name)
            if match and entry.is_dir() and not _pid_alive_elsewhere(int(match.group(2))):
                log.info("removing stale temporary checkpoint folder %s", entry.name)
                shutil.rmtree(entry, ignore_errors=True)

    # -- loading ----------------------------------------------------------------
    def load_latest(self, learner: "ContinualRecommender") -> Optional[dict]:
        """Restore the newest complete checkpoint into ``learner``; returns its ``extra``.

        None when ``state_dir`` holds no checkpoint. Torn or corrupt ones are
        skipped (WARNING, counted in ``fallbacks``). Raises ``CheckpointError``
        when the checkpoint was written with incompatible settings, or when
        checkpoints exist but none is usable.
        """
        self.fallbacks = 0
        candidates = self.checkpoints()
        for path in candidates:
            try:
                loaded = _parse(_verify(path))
            except _Torn as exc:
                self.fallbacks += 1
                log.warning("skipping torn or corrupt checkpoint %s: %s; falling back to the previous one",
                            path, exc)
                continue
            _check_config(loaded["config.json"], learner, path)
            try:
                _apply(loaded, learner)
            except Exception as exc:  # noqa: BLE001 - verified files that still do not fit this learner
                raise CheckpointError(
                    f"checkpoint {path} could not be restored into this learner ({exc!r}); start with a fresh "
                    "--state-dir, or run with the settings and version it was written with") from exc
            self.last_path = path
            log.info("restored checkpoint %s: model version %d (%d fallbacks)", path.name,
                     learner.model_version, self.fallbacks)
            return loaded["extra.json"]
        if candidates:
            raise CheckpointError(
                f"all {len(candidates)} checkpoints in {self.state_dir} are torn or corrupt (see the warnings above); "
                "move the folder away to start fresh, or restore it from a backup")
        return None

    def latest_extra(self) -> Optional[dict]:
        """The ``extra`` dict of the checkpoint ``load_latest`` would restore, without a learner.

        Same rule (newest complete one; torn or corrupt ones skipped with a WARNING),
        for tools and tests that only need the caller's bookkeeping, e.g. the
        worker's offsets and totals. None when there is no usable checkpoint.
        """
        for path in self.checkpoints():
            try:
                return json.loads(_verify(path)["extra.json"])
            except (_Torn, ValueError) as exc:
                log.warning("skipping torn or corrupt checkpoint %s: %s", path, exc)
        return None


# -- writing helpers --------------------------------------------------------------

def _write(path: Path, data: bytes) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root, topdown=False):
        _fsync_path(Path(dirpath))


def _files_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _hash_file(path: Path, keep: bool) -> tuple[int, str, Optional[bytes]]:
    digest, size, chunks = hashlib.sha256(), 0, []
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
            size += len(block)
            if keep:
                chunks.append(block)
    return size, digest.hexdigest(), b"".join(chunks) if keep else None


def _tensors(items: dict) -> bytes:
    return st_save({k: _cpu(v) for k, v in items.items()})


def _cpu(value) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    return tensor.detach().to("cpu").contiguous()


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _serialise(learner: "ContinualRecommender", extra_bytes: bytes) -> dict[str, bytes]:
    """Every file of a checkpoint except ``model/`` and the manifest, as bytes."""
    model, parts = learner.model, learner.parts
    out: dict[str, bytes] = {"config.json": _json(asdict(learner.config)), "extra.json": extra_bytes}

    # The module's own parameters; id tables are saved at full capacity (exact shapes).
    out["learner.safetensors"] = _tensors(dict(model.state_dict()))

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
                    opt_tensors[f"{name}/{key}"] = value
                else:
                    opt_scalars[f"{name}/{key}"] = value
    out["optimizer.safetensors"] = _tensors(opt_tensors)

    if parts.ewc is not None:
        out["ewc.safetensors"] = _tensors(parts.ewc.state())

    replay_meta = None
    if parts.replay is not None:
        policy = parts.replay.storage_policy
        rows, weights, items = _materialise_buffer(policy.buffer, learner.config.history_length)
        replay = {"hist_rows": rows, "hist_weights": weights, "item_rows": items}
        if torch.is_tensor(getattr(policy, "_buffer_weights", None)):
            replay["reservoir_weights"] = policy._buffer_weights
        out["replay.safetensors"] = _tensors(replay)
        replay_meta = {"samples": int(len(items)), "seen_samples": getattr(policy, "seen_samples", None)}

    users = learner.users.state()
    out["users.safetensors"] = _tensors({k: users[k] for k in ("slots", "rows", "weights", "seq", "count")})
    out["users.json"] = _json({"user_ids": users["user_ids"], "length": int(users["length"]),
                               "evictions": int(users["evictions"])})

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
    out["catalogue.json"] = _json(learner.catalogue.state())

    pending = np.array(learner._pending, dtype=np.int64).reshape(-1, 3)
    state_tensors = {"pending": pending, "published": np.asarray(learner._published, np.float32),
                     "rng_cpu": torch.get_rng_state()}
    if learner.device.type == "cuda":
        state_tensors["rng_cuda"] = torch.cuda.get_rng_state(learner.device)
    out["state.safetensors"] = _tensors(state_tensors)
    stats = parts.stats
    out["state.json"] = _json({
        "format": FORMAT,
        "model_version": int(learner.model_version),
        "event_seq": int(learner._seq),
        "refresh_cursor": int(learner._refresh_cursor),
        "samples_shed": int(getattr(learner, "samples_shed", 0)),
        "n_items": int(model.n_items),
        "features": {"rows": n_rows, "kind": kind},
        "optimizer": {"groups": groups, "scalars": opt_scalars},
        "ewc": {"last_penalty": float(parts.ewc.last_penalty)} if parts.ewc is not None else None,
        "replay": replay_meta,
        "stats": {"steps": stats.steps, "samples": stats.samples, "seconds": stats.seconds,
                  "last_loss": stats.last_loss},
    })
    return out


def _materialise_buffer(buffer, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The replay buffer's samples as three tensors, in buffer order."""
    n = len(buffer)
    if n == 0:
        return torch.zeros(0, length, dtype=torch.long), torch.zeros(0, length), torch.zeros(0, dtype=torch.long)
    fast = _gather_flat(buffer)
    if fast is not None:
        # Cheap guard against Avalanche internals changing: compare with the public path.
        for i in {0, n // 2, n - 1}:
            sample = buffer[i]
            if not all(torch.equal(fast[k][i], torch.as_tensor(sample[k])) for k in range(3)):
                fast = None
                break
    if fast is not None:
        return fast
    samples = [buffer[i] for i in range(n)]
    return tuple(torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in range(3))  # type: ignore[return-value]


def _gather_flat(buffer) -> Optional[tuple[torch.Tensor, ...]]:
    """Vectorised gather through Avalanche's flattened datasets (None if not applicable)."""
    flat = getattr(buffer, "_flat_data", None)
    datasets = getattr(flat, "_datasets", None)
    if not datasets or _has_transforms(flat):
        return None
    if not all(isinstance(d, torch.utils.data.TensorDataset) and len(d.tensors) >= 3 for d in datasets):
        return None
    try:
        indices = torch.as_tensor(list(flat._get_lazy_indices()), dtype=torch.long)
        return tuple(torch.cat([d.tensors[k] for d in datasets])[indices] for k in range(3))
    except Exception:  # noqa: BLE001 - any surprise: use the slow public path
        return None


def _has_transforms(flat) -> bool:
    try:
        return any(value is not None
                   for attr in ("_transform_groups", "_frozen_transform_groups")
                   for value in getattr(getattr(flat, attr, None), "transform_groups", {}).values())
    except Exception:  # noqa: BLE001
        return True


def _export_hf_model(learner: "ContinualRecommender", folder: Path) -> dict[str, dict]:
    """The encoder with the learner's trained layers merged in, as a Hugging Face folder.

    ``learners.adapters.export_model(merged=True)``: the base model's state dict
    with the trained top swapped in (LoRA deltas merged), the tokenizer,
    ``recstream.json`` and the base folder's sentence-transformers files.
    """
    from learners.adapters import export_model

    export_model(learner, folder, merged=True)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _fsync_path(path)
        size, digest, _ = _hash_file(path, keep=False)
        files[path.relative_to(folder.parent).as_posix()] = {"size": size, "sha256": digest}
    return files


def _quick_check(path: Path) -> bool:
    """Cheap completeness test (manifest parses, sizes match) used when pruning."""
    try:
        files = _read_manifest(path)
        return all((path / name).stat().st_size == meta["size"] for name, meta in files.items())
    except (_Torn, OSError):
        return False
    except CheckpointError:  # a format this version does not know: leave it alone
        return True


def _pid_alive_elsewhere(pid: int) -> bool:
    """True when another live process may still be writing that tmp folder."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


# -- reading helpers --------------------------------------------------------------

def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise _Torn(f"no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_bytes())
        files = manifest["files"]
        if not isinstance(files, dict) or manifest.get("files_sha256") != _files_digest(files):
            raise ValueError("file list does not match its checksum")
        version = int(manifest["format"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _Torn(f"{MANIFEST} is not valid ({exc})") from exc
    if version > FORMAT:
        raise CheckpointError(f"checkpoint {path} was written by a newer recstream (format {manifest['format']}); "
                              "upgrade, or start with a fresh --state-dir")
    for name in files:
        if name.startswith("/") or ".." in Path(name).parts:
            raise _Torn(f"{MANIFEST} names a path outside the folder: {name!r}")
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise _Torn(f"{MANIFEST} does not list {', '.join(missing)}")
    return files


def _verify(path: Path) -> dict[str, bytes]:
    """Check every file against the manifest; returns the bytes of the top-level files."""
    files = _read_manifest(path)
    blobs = {}
    for name, meta in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise _Torn(f"{name} is missing")
        if file.stat().st_size != meta["size"]:
            raise _Torn(f"{name} has {file.stat().st_size} bytes, the manifest says {meta['size']}")
        keep = "/" not in name
        try:
            size, digest, data = _hash_file(file, keep)
        except OSError as exc:
            raise _Torn(f"{name} cannot be read ({exc})") from exc
        if digest != meta["sha256"] or size != meta["size"]:
            raise _Torn(f"{name} does not match its sha256 in the manifest")
        if keep:
            blobs[name] = data
    return blobs


def _normalised_path(value: Any) -> str:
    return os.path.realpath(os.path.expanduser(str(value)))


def _check_config(saved: dict, learner: "ContinualRecommender", path: Path) -> None:
    # Through JSON, as saved (tuples become lists); keys an older checkpoint lacks take today's defaults.
    current = json.loads(_json(asdict(learner.config)))
    defaults = json.loads(_json({f.name: f.default for f in fields(learner.config) if f.default is not MISSING}))
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


def _parse(blobs: dict[str, bytes]) -> dict:
    """Decode every file (no learner touched yet); undecodable content is torn."""
    try:
        out = {name: json.loads(data) if name.endswith(".json") else st_load(data)
               for name, data in blobs.items() if name.endswith((".json", ".safetensors"))}
    except Exception as exc:  # noqa: BLE001 - hashes matched, so this is a writer bug or foreign folder
        raise _Torn(f"cannot decode its files ({exc!r})") from exc
    if int(out["state.json"].get("format", 0)) > FORMAT:
        raise CheckpointError("checkpoint written by a newer recstream; upgrade, or start with a fresh --state-dir")
    return out


def _apply(data: dict, learner: "ContinualRecommender") -> None:
    """Put a parsed checkpoint into ``learner`` (same config, freshly built or not)."""
    from learners.experience import make_experience

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
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name in params and params[name].shape != value.shape and "." not in name:
            setattr(model, name, nn.Parameter(torch.empty(value.shape, dtype=params[name].dtype,
                                                          device=params[name].device)))
    model.load_state_dict(tensors, strict=True)
    model.n_items = int(state["n_items"])

    # Optimizer: rebuild parameter groups by name, then per-parameter state.
    _load_optimizer(parts, model, state["optimizer"], data["optimizer.safetensors"])

    if parts.ewc is not None:
        ewc_tensors = data.get("ewc.safetensors")
        if ewc_tensors is not None:
            parts.ewc.importance.clear()
            parts.ewc.anchor.clear()
            parts.ewc.load_state({k: v.to(device) for k, v in ewc_tensors.items()})
            parts.ewc.last_penalty = float((state.get("ewc") or {}).get("last_penalty", 0.0))
        else:
            log.warning("checkpoint has no EWC state (it was written with another strategy): EWC starts empty")

    if parts.replay is not None:
        replay = data.get("replay.safetensors")
        policy = parts.replay.storage_policy
        if replay is not None:
            keep = min(len(replay["item_rows"]), int(policy.max_size))
            dataset = make_experience(replay["hist_rows"][:keep].numpy(), replay["hist_weights"][:keep].numpy(),
                                      replay["item_rows"][:keep].numpy(), 0).dataset
            policy.buffer = dataset
            if "reservoir_weights" in replay and hasattr(policy, "_buffer_weights"):
                policy._buffer_weights = replay["reservoir_weights"][:keep].clone()
            seen = (state.get("replay") or {}).get("seen_samples")
            if seen is not None and hasattr(policy, "seen_samples"):
                policy.seen_samples = seen
        else:
            log.warning("checkpoint has no replay buffer (it was written with another strategy): replay starts empty")

    users, user_meta = data["users.safetensors"], data["users.json"]
    learner.users.load_state({
        "user_ids": user_meta["user_ids"], "slots": users["slots"].numpy(), "rows": users["rows"].numpy(),
        "weights": users["weights"].numpy(), "seq": users["seq"].numpy(), "count": users["count"].numpy(),
        "length": user_meta["length"], "evictions": user_meta["evictions"]})

    tables = data["state.safetensors"]
    learner.model_version = int(state["model_version"])
    learner._seq = int(state["event_seq"])
    learner._refresh_cursor = int(state["refresh_cursor"])
    learner.samples_shed = int(state.get("samples_shed", 0))
    learner._pending = [tuple(int(v) for v in row) for row in tables["pending"].tolist()]
    learner._published = tables["published"].numpy().copy()
    stats = parts.stats
    for key, value in state.get("stats", {}).items():
        setattr(stats, key, value)
    learner._tables_stale = True

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
    # Avalanche maps parameters by name from here on (no reset on the next experience).
    strategy.optimized_param_id = dict(named)
