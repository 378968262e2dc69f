"""``MANIFEST.json``: size and sha256 of every file of a checkpoint, and checking a folder against it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from learners.errors import CheckpointError

FORMAT = 1
MANIFEST = "MANIFEST.json"
MODEL_DIR = "model"
# What ``collect`` always writes; a manifest without one of them is not a checkpoint of ours.
REQUIRED = ("config.json", "state.json", "state.safetensors", "learner.safetensors", "optimizer.safetensors",
            "users.safetensors", "users.json", "features.safetensors", "catalogue.json", "extra.json",
            f"{MODEL_DIR}/config.json")


class TornCheckpoint(Exception):
    """A checkpoint folder that cannot be used (reason in the message)."""


def files_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def manifest_bytes(head: dict, files: dict[str, dict]) -> bytes:
    """The manifest: ``head`` (format, version, ...) plus the file list and a checksum over it."""
    manifest = {**head, "files": files, "files_sha256": files_digest(files)}
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def hash_file(path: Path, keep: bool) -> tuple[int, str, Optional[bytes]]:
    """Size and sha256 of a file read in blocks; its bytes too when ``keep``."""
    digest, size, chunks = hashlib.sha256(), 0, []
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
            size += len(block)
            if keep:
                chunks.append(block)
    return size, digest.hexdigest(), b"".join(chunks) if keep else None


def read_manifest(path: Path) -> dict:
    """The manifest's file list; ``TornCheckpoint`` when it is missing or invalid."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise TornCheckpoint(f"no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_bytes())
        files = manifest["files"]
        if not isinstance(files, dict) or manifest.get("files_sha256") != files_digest(files):
            raise ValueError("file list does not match its checksum")
        version = int(manifest["format"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TornCheckpoint(f"{MANIFEST} is not valid ({exc})") from exc
    if version > FORMAT:
        raise CheckpointError(f"checkpoint {path} was written by a newer recstream (format {manifest['format']}); "
                              "upgrade, or start with a fresh --state-dir")
    for name in files:
        if name.startswith("/") or ".." in Path(name).parts:
            raise TornCheckpoint(f"{MANIFEST} names a path outside the folder: {name!r}")
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise TornCheckpoint(f"{MANIFEST} does not list {', '.join(missing)}")
    return files


def verify(path: Path) -> dict[str, bytes]:
    """Check every file against the manifest; returns the bytes of the top-level files."""
    files = read_manifest(path)
    blobs = {}
    for name, meta in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise TornCheckpoint(f"{name} is missing")
        if file.stat().st_size != meta["size"]:
            raise TornCheckpoint(f"{name} has {file.stat().st_size} bytes, the manifest says {meta['size']}")
        keep = "/" not in name
        try:
            size, digest, data = hash_file(file, keep)
        except OSError as exc:
            raise TornCheckpoint(f"{name} cannot be read ({exc})") from exc
        if digest != meta["sha256"] or size != meta["size"]:
            raise TornCheckpoint(f"{name} does not match its sha256 in the manifest")
        if keep:
            blobs[name] = data
    return blobs


def quick_check(path: Path) -> bool:
    """Cheap completeness test (manifest parses, sizes match) used when pruning."""
    try:
        files = read_manifest(path)
        return all((path / name).stat().st_size == meta["size"] for name, meta in files.items())
    except (TornCheckpoint, OSError):
        return False
    except CheckpointError:  # a format this version does not know: leave it alone
        return True
