"""A rank without checkpoints gets the group's: rank 0's linked where it can reach rank 0's folder,
else sent over the process group (gloo, real processes) by the lowest rank that has some."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from learners.checkpoint.manifest import FORMAT, MANIFEST, REQUIRED, manifest_bytes, quick_check
from learners.checkpoint.store import CheckpointStore, checkpoint_folders
# Avalanche (under learners.continual.distributed) refuses to be first imported in a rank other than 0.
from learners.continual.distributed import Collective
from stream.worker.group_join import join_group, rank_0_folder

NAME = "ckpt-000000000005-3"


def _fake_checkpoint(state_dir: Path, world_size: int) -> Path:
    """A complete-looking checkpoint folder: every required file, a large one, the manifest."""
    folder = state_dir / NAME
    files = {}
    for name in REQUIRED:
        data = json.dumps({"world_size": world_size}).encode() if name == "extra.json" else name.encode() * 3
        if name == "learner.safetensors":
            data = os.urandom((33 << 20) + 5)  # more than one broadcast piece
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": "not checked here"}
    (folder / MANIFEST).write_bytes(manifest_bytes({"format": FORMAT, "version": 5}, files))
    assert quick_check(folder)
    return folder


def _rank(rank: int, init_file: str, root: str, holders: list[int], world: int, peer: bool, out: str,
          stale: dict[int, list]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    store = CheckpointStore(Path(root) / f"rank-{rank}")
    if rank > 0 and peer:
        store.peer = Path(root) / "rank-0"
    marks = [[(5, 0)] if r in holders else [] for r in range(3)]
    for r, held in stale.items():  # a folder from an earlier time of the group: older, unshared marks
        marks[r] = held
    joined = join_group(Collective(), store, marks)
    Path(out, f"joined-{rank}").write_text(str(joined))
    dist.destroy_process_group()


def _run(tmp_path: Path, holders: list[int], world: int, peer: bool,
         stale: dict[int, list] | None = None) -> dict[int, bool]:
    root = tmp_path / "state"
    for rank in holders:
        _fake_checkpoint(root / f"rank-{rank}", world)
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(root), holders, world, peer, str(tmp_path), stale or {}),
             nprocs=3, join=True)
    return {r: (tmp_path / f"joined-{r}").read_text() == "True" for r in range(3)}


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    return names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_a_rank_on_a_volume_of_its_own_gets_rank_0s_checkpoint_over_the_process_group(tmp_path):
    joined = _run(tmp_path, holders=[0, 1], world=2, peer=False)
    assert joined == {0: False, 1: False, 2: True}
    rank0, rank2 = tmp_path / "state" / "rank-0" / NAME, tmp_path / "state" / "rank-2" / NAME
    assert [p.name for p in checkpoint_folders(rank2.parent)] == [NAME] and quick_check(rank2)
    assert _same_files(rank0, rank2)
    assert not os.path.samefile(rank0 / "learner.safetensors", rank2 / "learner.safetensors")  # sent, not linked
    assert not any(p.name.startswith(".tmp") for p in rank2.parent.iterdir())


def test_a_rank_that_reaches_rank_0s_folder_links_it(tmp_path):
    joined = _run(tmp_path, holders=[0, 1], world=2, peer=True)
    assert joined == {0: False, 1: False, 2: True}
    rank0, rank2 = tmp_path / "state" / "rank-0" / NAME, tmp_path / "state" / "rank-2" / NAME
    assert os.path.samefile(rank0 / "learner.safetensors", rank2 / "learner.safetensors")


def test_a_rank_of_the_recorded_group_without_checkpoints_starts_from_the_groups(tmp_path):
    # Rank 2 was one of three: its first checkpoint never got written (or its folder was lost).
    # Waiting for someone to copy a folder would keep the group down; the group's model will do.
    joined = _run(tmp_path, holders=[0, 1], world=3, peer=False)
    assert joined == {0: False, 1: False, 2: True}
    assert _same_files(tmp_path / "state" / "rank-0" / NAME, tmp_path / "state" / "rank-2" / NAME)


def test_without_rank_0s_checkpoints_the_lowest_rank_with_some_sends_them(tmp_path):
    joined = _run(tmp_path, holders=[1, 2], world=3, peer=True)  # rank 0's folder is what the others link
    assert joined == {0: True, 1: False, 2: False}
    rank0, rank1 = tmp_path / "state" / "rank-0" / NAME, tmp_path / "state" / "rank-1" / NAME
    assert _same_files(rank1, rank0)
    assert not os.path.samefile(rank1 / "learner.safetensors", rank0 / "learner.safetensors")  # sent


def test_nobody_joins_where_every_rank_or_no_rank_has_checkpoints(tmp_path):
    for name, holders in (("all", [0, 1, 2]), ("none", [])):
        (tmp_path / name).mkdir()  # a rendezvous file of its own
        assert _run(tmp_path / name, holders=holders, world=3, peer=False) == {0: False, 1: False, 2: False}


def test_a_rank_whose_folder_is_from_an_earlier_time_of_the_group_starts_from_the_groups(tmp_path):
    # Rank 1 holds only old checkpoints none of the others has (its pod was scaled away and back).
    joined = _run(tmp_path, holders=[0, 2], world=3, peer=False, stale={1: [(1, 0), (2, 1)]})
    assert joined == {0: False, 1: True, 2: False}
    assert _same_files(tmp_path / "state" / "rank-0" / NAME, tmp_path / "state" / "rank-1" / NAME)


def _find_rank_0(rank: int, init_file: str, roots: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    root = Path(roots[rank])
    found = rank_0_folder(Collective(), root / f"rank-{rank}", root / "rank-0")
    Path(out, f"found-{rank}").write_text(str(found))
    dist.destroy_process_group()


def test_rank_0s_folder_is_linked_from_only_where_it_is_rank_0s_live_one(tmp_path):
    shared, own = tmp_path / "shared", tmp_path / "own"
    (own / "rank-0").mkdir(parents=True)
    (own / "rank-0" / ".group-token").write_text("left by an earlier rank 0 on this volume")
    mp.spawn(_find_rank_0, args=(str(tmp_path / "init"), [str(shared), str(shared), str(own)], str(tmp_path)),
             nprocs=3, join=True)
    found = {r: (tmp_path / f"found-{r}").read_text() for r in range(3)}
    assert found == {0: "None", 1: str(shared / "rank-0"), 2: "None"}
