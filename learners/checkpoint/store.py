"""``CheckpointStore``: numbered checkpoint folders in ``state_dir``; save, prune, newest complete one wins."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from learners.checkpoint.atomic import commit_folder, fsync_path, fsync_tree, link, write_file, write_or_link
from learners.checkpoint.collect import collect, compact_json, export_hf_model, model_file_entries
from learners.checkpoint.compatibility import check_config
from learners.checkpoint.manifest import (FORMAT, MANIFEST, MODEL_DIR, TornCheckpoint, manifest_bytes, quick_check,
                                          read_manifest, verify)
from learners.checkpoint.restore import apply, parse
from learners.errors import CheckpointError
from learners.checkpoint.export import FROZEN_SHARD

if TYPE_CHECKING:  # pragma: no cover
    from learners.learner import ContinualRecommender

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^ckpt-(\d+)-(\d+)$")
_TMP = re.compile(r"^\.tmp-(\d+)-(\d+)$")


class CheckpointStore:
    """Saves and restores a ``ContinualRecommender`` plus the caller's ``extra`` dict."""

    def __init__(self, state_dir: os.PathLike | str, keep: int = 3, peer: Optional[os.PathLike | str] = None) -> None:
        """``peer``: another store's folder whose checkpoints of a model version hold files identical to
        some of this one's (``--distributed``: rank 0's, with the group's weights); ``write`` links them."""
        if keep < 1:
            raise CheckpointError(f"keep must be at least 1 (got {keep})")
        self.state_dir = Path(state_dir)
        self.keep = int(keep)
        self.fallbacks = 0  # torn/corrupt checkpoints skipped by the last load_latest
        self.last_path: Optional[Path] = None
        self.last_bytes = 0
        self.last_linked_bytes = 0  # of last_bytes, what was hard-linked from the previous checkpoint
        self.last_seconds = 0.0
        # (encoder identity, path, manifest entry) of the frozen model shard last written: the
        # next checkpoint of the same encoder hard-links it (collect.export_hf_model).
        self._frozen_shard: Optional[tuple[tuple, Path, dict]] = None
        # The newest checkpoint written or restored, and its manifest's file entries: files the
        # next one would write unchanged are hard-linked from it instead.
        self._previous: Optional[tuple[Path, dict[str, dict]]] = None
        self._last_seq = 0
        self._writing: set[Path] = set()  # tmp folders prepared and not yet written: never pruned
        self.peer = Path(peer) if peer is not None else None

    # -- listing ----------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Final-named checkpoint folders, newest first (complete or not)."""
        return checkpoint_folders(self.state_dir)

    def _next_seq(self) -> int:
        seqs = [int(m.group(2)) for p in self.checkpoints() if (m := _CKPT.match(p.name))]
        return max(seqs, default=0) + 1

    # -- saving -----------------------------------------------------------------
    def save(self, learner: "ContinualRecommender", extra: Optional[dict] = None) -> Path:
        """Write a complete checkpoint atomically; returns its folder.

        ``write(prepare(learner, extra))`` in one go. Raises ``OSError`` (disk) or
        ``CheckpointError`` (anything else); a failed save leaves the previous
        checkpoints untouched.
        """
        return self.write(self.prepare(learner, extra))

    def prepare(self, learner: "ContinualRecommender", extra: Optional[dict] = None) -> PreparedCheckpoint:
        """First half of a save, while the learner stands still: its state serialised to bytes
        in memory and its encoder exported into a temporary folder;
        the learner may train on as soon as this returns. Raises as ``save`` does."""
        started = time.perf_counter()
        try:
            extra_bytes = compact_json(extra if extra is not None else {})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint's extra dict is not JSON-serialisable: {exc}") from exc
        self.state_dir.mkdir(parents=True, exist_ok=True)
        version = int(learner.model_version)
        # Above the last one prepared too: the previous write may not have committed yet.
        seq = self._last_seq = max(self._next_seq(), self._last_seq + 1)
        tmp = self.state_dir / f".tmp-{seq}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        encoder_key = _encoder_key(learner)
        self._writing.add(tmp)
        try:
            with _errors_said_where(self.state_dir):
                tmp.mkdir()
                blobs = collect(learner, extra_bytes)
                reuse = self._frozen_shard
                reuse = reuse[1:] if reuse and reuse[0] == encoder_key and reuse[1].is_file() else None
                model_files = export_hf_model(learner, tmp / MODEL_DIR, reuse)
        except BaseException:
            self._discard(tmp)
            raise
        return PreparedCheckpoint(tmp=tmp, final=self.state_dir / f"ckpt-{version:012d}-{seq}", version=version,
                                  seq=seq, blobs=blobs, model_files=model_files, encoder_key=encoder_key,
                                  prepare_s=time.perf_counter() - started)

    def write(self, prepared: PreparedCheckpoint, peer_wait_s: float = 0.0) -> Path:
        """Second half of a save, on any thread: write, fsync and hash the files, commit the folder
        (the manifest last, then the rename), prune old checkpoints. Reads nothing of the learner.
        Checkpoints prepared one after another must be written in that order.

        Files identical to the previous checkpoint's, or to the peer's newest complete checkpoint of
        the same model version, are hard-linked, not written; ``peer_wait_s``: how long to wait for
        the peer's to appear (one the peer writes in the same turn)."""
        started = time.perf_counter()
        tmp, final = prepared.tmp, prepared.final
        try:
            with _errors_said_where(self.state_dir):
                peer = self._peer_files(prepared.version, peer_wait_s)
                files, linked = {}, 0
                for name, data in prepared.blobs.items():
                    candidates = self._unchanged(name) + peer.get(name, [])
                    files[name], was_linked = write_or_link(tmp / name, data, candidates)
                    linked += len(data) if was_linked else 0
                files.update(model_file_entries(tmp, prepared.model_files))
                linked += sum(entry["size"] for entry in prepared.model_files.values() if entry is not None)
                for name, entry in files.items():  # the exported model's files, where the peer has them
                    if prepared.model_files.get(name, entry) is None and any(
                            e == entry and link(source, tmp / name) for source, e in peer.get(name, [])):
                        linked += entry["size"]
                head = {"format": FORMAT, "model_version": prepared.version, "seq": prepared.seq,
                        "created": time.time()}
                commit_folder(tmp, final, MANIFEST, manifest_bytes(head, files))
        finally:
            self._discard(tmp)  # after the commit (a rename) nothing is left of it
        self.last_path = final
        self._remember(final, files, prepared.encoder_key)
        self.last_bytes = sum(f["size"] for f in files.values())
        self.last_linked_bytes = linked
        try:
            self._prune(keep_path=final)
        except OSError as exc:  # the checkpoint itself is committed: pruning can wait for the next one
            log.warning("could not prune old checkpoints in %s: %s", self.state_dir, exc)
        self.last_seconds = prepared.prepare_s + time.perf_counter() - started
        log.info("checkpoint %s written: model version %d, %.1f MB (%.1f MB of it unchanged, linked) in %.2f s "
                 "(%.2f s of it with the learner held)", final.name, prepared.version, self.last_bytes / 1e6,
                 linked / 1e6, self.last_seconds, prepared.prepare_s)
        return final

    def _remember(self, path: Path, files: dict[str, dict], encoder_key: tuple) -> None:
        """``path`` is the newest checkpoint: the next one links what it would write unchanged."""
        self._previous = (path, files)
        shard = f"{MODEL_DIR}/{FROZEN_SHARD}"
        self._frozen_shard = (encoder_key, path / shard, files[shard]) if shard in files else None

    def _unchanged(self, name: str) -> list[tuple[Path, dict]]:
        """The previous checkpoint's file of this name and its manifest entry, if there is one."""
        if self._previous is None or name not in self._previous[1]:
            return []
        return [(self._previous[0] / name, self._previous[1][name])]

    def _peer_files(self, version: int, wait_s: float) -> dict[str, list[tuple[Path, dict]]]:
        """The files of the peer's newest complete checkpoint of ``version`` and their manifest
        entries, waiting up to ``wait_s`` for one; {} without a peer or such a checkpoint."""
        if self.peer is None:
            return {}
        deadline = time.monotonic() + wait_s
        while True:
            for path in checkpoint_folders(self.peer):
                if checkpoint_version(path) == version:
                    try:
                        return {name: [(path / name, entry)] for name, entry in read_manifest(path).items()}
                    except (TornCheckpoint, OSError, CheckpointError):
                        continue
            if time.monotonic() >= deadline:
                return {}
            time.sleep(0.05)

    def _discard(self, tmp: Path) -> None:
        """Forget a temporary folder of this store's, removing what is left of it."""
        self._writing.discard(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once committed (renamed)

    def _prune(self, keep_path: Path) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones and stale tmp folders."""
        kept = 0
        for path in self.checkpoints():
            complete = path == keep_path or quick_check(path)
            if complete and kept < self.keep:
                kept += 1
                continue
            log.info("removing %s checkpoint %s", "old" if complete else "incomplete", path.name)
            shutil.rmtree(path, ignore_errors=True)
        for entry in self.state_dir.iterdir():
            match = _TMP.match(entry.name)
            if (match and entry.is_dir() and entry not in self._writing
                    and not _pid_alive_elsewhere(int(match.group(2)))):
                log.info("removing stale temporary checkpoint folder %s", entry.name)
                shutil.rmtree(entry, ignore_errors=True)

    def remove_older(self, newest: Path) -> list[Path]:
        """Remove every checkpoint folder older than ``newest`` (after an erasure: they still hold
        the erased user); returns the folders removed. ``newest`` must be complete."""
        match = _CKPT.match(newest.name)
        if match is None or not quick_check(newest):
            raise CheckpointError(f"{newest} is not a complete checkpoint: the older ones stay")
        seq = int(match.group(2))
        removed = []
        for path in self.checkpoints():
            older = _CKPT.match(path.name)
            if path != newest and int(older.group(2)) < seq:
                shutil.rmtree(path)
                removed.append(path)
        return removed

    # -- loading ----------------------------------------------------------------
    def load_latest(self, learner: "ContinualRecommender") -> Optional[dict]:
        """Restore the newest complete checkpoint into ``learner``; returns its ``extra``.

        None when ``state_dir`` holds no checkpoint. Torn or corrupt ones are
        skipped (WARNING, counted in ``fallbacks``). Raises ``CheckpointError``
        when the checkpoint was written with incompatible settings, or when
        checkpoints exist but none is usable.
        """
        return self._load_first(learner, self.checkpoints(), "")

    def load_version(self, learner: "ContinualRecommender", version: int) -> dict:
        """Restore the newest complete checkpoint of model ``version``; returns its ``extra``.

        Verified as ``load_latest`` does (torn ones of that version skipped); a
        ``CheckpointError`` when no usable checkpoint of that version is here."""
        candidates = [path for path in self.checkpoints() if checkpoint_version(path) == int(version)]
        return self.load_one_of(learner, candidates, f"of model version {version}")

    def load_one_of(self, learner: "ContinualRecommender", candidates: list[Path], what: str) -> dict:
        """Restore the first usable of ``candidates`` (this store's folders, newest first), skipping
        torn ones as ``load_latest`` does; ``what`` names them in the ``CheckpointError`` raised when
        none is usable or there are none."""
        extra = self._load_first(learner, candidates, f" {what}")
        if extra is None:
            raise CheckpointError(f"no checkpoint {what} in {self.state_dir}")
        return extra

    @staticmethod
    def files_of(path: Path) -> list[tuple[str, int]]:
        """(name, size) of every file of the complete checkpoint ``path``, its manifest last: what
        ``receive`` needs to rebuild it elsewhere."""
        files = [(name, int(meta["size"])) for name, meta in sorted(read_manifest(path).items())]
        return files + [(MANIFEST, (path / MANIFEST).stat().st_size)]

    def receive(self, name: str, files: Iterable[tuple[str, bytes]]) -> Path:
        """Rebuild another store's checkpoint ``name`` here from its files as ``files_of`` lists them
        (the manifest last, so the folder is complete only once every file is in); it appears whole
        or not at all, and a restore verifies every file against the manifest."""
        with self._placed(name) as tmp:
            for relative, data in files:
                if relative.startswith("/") or ".." in Path(relative).parts:
                    raise CheckpointError(f"a received checkpoint names a path outside its folder: {relative!r}")
                write_file(tmp / relative, data)
            fsync_tree(tmp)
        return self.state_dir / name

    def copy_in(self, path: Path) -> Path:
        """Make another store's complete checkpoint ``path`` one of this store's, under its name
        (files hard-linked, or copied across file systems; the folder appears whole or not at all)."""
        with self._placed(path.name) as tmp:
            shutil.copytree(path, tmp, copy_function=_link_or_copy)
        return self.state_dir / path.name

    @contextmanager
    def _placed(self, name: str):
        """A temporary folder to fill, renamed to checkpoint ``name`` here once filled."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".tmp-{_CKPT.match(name).group(2)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        yield tmp
        os.rename(tmp, self.state_dir / name)
        fsync_path(self.state_dir)

    def complete_versions(self) -> list[int]:
        """Model versions of the complete checkpoints here (the cheap check pruning uses), ascending."""
        return sorted({checkpoint_version(path) for path in complete_checkpoints(self.state_dir)})

    def _load_first(self, learner: "ContinualRecommender", candidates: list[Path], what: str) -> Optional[dict]:
        """Restore the first usable of ``candidates`` (newest first); None when there are none."""
        self.fallbacks = 0
        for path in candidates:
            try:
                loaded = parse(verify(path))
            except TornCheckpoint as exc:
                self.fallbacks += 1
                log.warning("skipping torn or corrupt checkpoint %s: %s; falling back to the previous one",
                            path, exc)
                continue
            check_config(loaded["config.json"], learner, path)
            try:
                apply(loaded, learner)
            except Exception as exc:  # noqa: BLE001 - verified files that still do not fit this learner
                raise CheckpointError(
                    f"checkpoint {path} could not be restored into this learner ({exc!r}); start with a fresh "
                    "--state-dir, or run with the settings and version it was written with") from exc
            self.last_path = path
            self._remember(path, read_manifest(path), _encoder_key(learner))
            log.info("restored checkpoint %s: model version %d (%d fallbacks)", path.name,
                     learner.model_version, self.fallbacks)
            return loaded["extra.json"]
        if candidates:
            raise CheckpointError(
                f"all {len(candidates)} checkpoints{what} in {self.state_dir} are torn or corrupt (see the warnings "
                "above); move the folder away to start fresh, or restore it from a backup")
        return None

    def remove_newer(self, current: Path) -> list[Path]:
        """Remove every checkpoint folder written after ``current`` (the one restored, when going back
        to an older one): later restores and pruning then never pick what was given up."""
        seq = int(_CKPT.match(current.name).group(2))
        removed = []
        for path in self.checkpoints():
            if int(_CKPT.match(path.name).group(2)) > seq:
                shutil.rmtree(path)
                removed.append(path)
        return removed

    def latest_extra(self) -> Optional[dict]:
        """The ``extra`` dict of the checkpoint ``load_latest`` would restore, without a learner.

        Same rule (newest complete one; torn or corrupt ones skipped with a WARNING),
        for tools and tests that only need the caller's bookkeeping, e.g. the
        worker's offsets and totals. None when there is no usable checkpoint.
        """
        for path in self.checkpoints():
            try:
                return json.loads(verify(path)["extra.json"])
            except (TornCheckpoint, ValueError) as exc:
                log.warning("skipping torn or corrupt checkpoint %s: %s", path, exc)
        return None


@dataclass(frozen=True)
class PreparedCheckpoint:
    """A checkpoint between ``CheckpointStore.prepare`` and ``CheckpointStore.write``."""
    tmp: Path                                 # the temporary folder it is built in
    final: Path                               # its name once committed
    version: int
    seq: int
    blobs: dict[str, bytes]                   # file contents, written by ``write``
    model_files: dict[str, Optional[dict]]    # exported into tmp; None: to be fsynced and hashed
    encoder_key: tuple
    prepare_s: float                          # time the learner was held


def _link_or_copy(source: str, target: str) -> None:
    """``copytree``'s copy function: a hard link where the file system allows it."""
    if not link(Path(source), Path(target)):
        shutil.copy2(source, target)


def checkpoint_folders(state_dir: Path) -> list[Path]:
    """Final-named checkpoint folders in ``state_dir``, newest first (complete or not)."""
    if not state_dir.is_dir():
        return []
    found = []
    for entry in state_dir.iterdir():
        match = _CKPT.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(2)), int(match.group(1)), entry))
    return [path for *_, path in sorted(found, reverse=True)]


def complete_checkpoints(state_dir: Path) -> list[Path]:
    """The complete checkpoint folders in ``state_dir`` (the cheap check pruning uses), newest first."""
    return [path for path in checkpoint_folders(state_dir) if quick_check(path)]


def checkpoint_version(path: Path) -> int:
    """The model version a checkpoint folder's name says."""
    return int(_CKPT.match(path.name).group(1))


def _encoder_key(learner: "ContinualRecommender") -> tuple:
    """What the frozen model shard depends on: a checkpoint of the same key may link the previous one's."""
    return id(learner.encoder), learner.config.train_layers, learner.config.train_params


@contextmanager
def _errors_said_where(state_dir: Path):
    """Disk errors and our own pass as they are; anything else becomes a ``CheckpointError``."""
    try:
        yield
    except (OSError, CheckpointError):
        raise
    except Exception as exc:
        raise CheckpointError(f"could not write a checkpoint to {state_dir}: {exc!r}") from exc


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
