"""Writing a folder so that it appears complete or not at all: fsynced files, a marker written last, rename."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_file(path: Path, data: bytes) -> dict:
    """Write and fsync one file; returns its manifest entry (size and sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


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
