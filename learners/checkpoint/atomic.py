"""Writing a folder so that it appears complete or not at all: fsynced files, a marker written last, rename."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence


def write_file(path: Path, data: bytes, digest: Optional[str] = None) -> dict:
    """Write and fsync one file; returns its manifest entry (size and sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return {"size": len(data), "sha256": digest or hashlib.sha256(data).hexdigest()}


def write_or_link(path: Path, data: bytes, candidates: Sequence[tuple[Path, dict]]) -> tuple[dict, bool]:
    """``write_file``, unless one of ``candidates`` (files of committed checkpoints and their manifest
    entries) holds exactly ``data``: then a hard link to it. Committed files are never written again,
    so sharing them is safe, and a checkpoint taken every few seconds writes only what changed.
    Returns the manifest entry and whether the file was linked."""
    digest = hashlib.sha256(data).hexdigest()
    for source, entry in candidates:
        if entry.get("size") == len(data) and entry.get("sha256") == digest and link(source, path):
            return {"size": len(data), "sha256": digest}, True
    return write_file(path, data, digest), False


def link(source: Path, path: Path) -> bool:
    """Hard-link ``source`` as ``path`` (replacing a file there); False where that cannot be done
    (pruned meanwhile, another file system, one without hard links): the caller writes instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    spare = path.with_name(path.name + ".link")
    try:
        os.link(source, spare)
        os.replace(spare, path)
        return True
    except OSError:
        try:
            os.unlink(spare)
        except OSError:
            pass
        return False


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, _ in os.walk(root, topdown=False):
        fsync_path(Path(dirpath))


def commit_folder(tmp: Path, final: Path, marker: str, marker_data: bytes) -> None:
    """Make the filled ``tmp`` folder durable and rename it to ``final`` (the commit point).

    ``marker`` is written last: its presence and validity is what makes the
    folder complete, so a crash at any step leaves no complete-looking folder.
    """
    fsync_tree(tmp)
    write_file(tmp / marker, marker_data)
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_path(final.parent)
