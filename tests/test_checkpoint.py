"""Checkpoints: atomic folders, exact round trip, torn-checkpoint fallback, pruning, HF export.

Uses the real default model (all-MiniLM-L6-v2) with a small learner.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from learners.checkpoint import MANIFEST, CheckpointStore
from learners.checkpoint.collect import collect
from learners.checkpoint.manifest import read_manifest, verify
from learners.checkpoint.restore import apply, parse
from learners.encoder import TextEncoder
from learners.errors import CheckpointError, RecstreamError
from learners.checkpoint.export import TRAINED_SHARD
from learners.learner import ContinualRecommender, LearnerConfig
from learners.records import Event
from learners.synthetic import SyntheticWorld
from stream.config import default_model_path

pytestmark = pytest.mark.integration  # real model; the whole module takes ~30-60 s on two cores

WORLD = SyntheticWorld(n_items=50, n_users=40, seed=3)
EVENTS = list(WORLD.events(460))
ITEMS = WORLD.items()


@pytest.fixture(scope="module")
def config() -> LearnerConfig:
    return LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=32, negatives=32,
                         batch_size=32, history_length=16, max_text_tokens=24, replay_size=256,
                         replay_batch=16, refresh_per_update=8, train_layers=1, seed=7,
                         # Published from averaged weights, users from profiles: both must round-trip.
                         serving_average=0.9, profile_length=8)


@pytest.fixture(scope="module")
def encoder(config) -> TextEncoder:
    return TextEncoder(config.model_path, config.train_layers, config.max_text_tokens, torch.device("cpu"))


def train_learner(config, encoder=None) -> ContinualRecommender:
    """Trained twice, with items added late, an item that never got text, and pending samples."""
    learner = ContinualRecommender(config, encoder=encoder)
    learner.add_items(ITEMS[:45])
    for event in EVENTS[:200]:
        learner.observe(event)
    assert learner.learn() is not None
    for event in EVENTS[200:330]:
        learner.observe(event)
    learner.observe(Event("e-textless", "user-1", "item-no-text", "click", 1.0))
    assert learner.learn() is not None
    assert learner.item_item.active  # fitted by now: its factors must round-trip too
    learner.items_to_publish()
    learner.add_items(ITEMS[45:])  # new texts after training: their rows come after the trained ones
    for event in EVENTS[330:400]:
        learner.observe(event)  # left pending
    return learner


def all_users(learner) -> list[str]:
    return sorted(learner.users.user_ids()) + ["user-never-seen"]


@pytest.fixture(scope="module")
def trained(config, encoder) -> ContinualRecommender:
    return train_learner(config, encoder)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, config, encoder):
    """A state dir with two checkpoints; returns (dir, (version, extra) of the older, of the newer)."""
    state = tmp_path_factory.mktemp("two") / "state"
    learner = train_learner(config, encoder)
    store = CheckpointStore(state)
    store.save(learner, {"which": "older", "offsets": [["events", 0, 400]]})
    older = learner.model_version
    for event in EVENTS[400:460]:
        learner.observe(event)
    learner.learn()
    store.save(learner, {"which": "newer", "offsets": [["events", 0, 460]]})
    assert len(store.checkpoints()) == 2
    return state, older, learner.model_version


def optimizer_state_by_name(learner) -> dict:
    opt = learner.parts.strategy.optimizer
    return {name: opt.state[p] for name, p in learner.model.named_parameters() if p in opt.state}


# -- round trip -------------------------------------------------------------------

def test_round_trip_restores_identical_vectors_and_state(tmp_path, config, trained):
    # The learner averages the item side only: user vectors follow the live user side.
    assert set(trained.average.shadow) == {"item_emb", "text_proj.weight", "text_proj.bias"}
    store = CheckpointStore(tmp_path / "state")
    extra = {"event_offsets": [["events", 0, 400], ["events", 1, 12]], "ledger": [f"e-{i}" for i in range(1000)]}
    path = store.save(trained, extra)
    assert path.name.startswith(f"ckpt-{trained.model_version:012d}-")
    assert (path / MANIFEST).is_file() and not list(path.parent.glob(".tmp-*"))
    saved_rng = torch.get_rng_state()
    # Id-table moments and EWC state are saved up to n_items (the spare rows hold nothing);
    # the comparisons below check they come back padded exactly.
    n_items, capacity = trained.model.n_items, trained.model.item_emb.shape[0]
    assert n_items < capacity
    assert load_file(path / "optimizer.safetensors")["item_emb/exp_avg"].shape[0] == n_items
    assert load_file(path / "ewc.safetensors")["anchor/item_emb"].shape[0] == n_items

    fresh = ContinualRecommender(config)  # a restart: its own encoder, nothing shared
    assert fresh.model_version == 0
    loader = CheckpointStore(tmp_path / "state")
    assert loader.load_latest(fresh) == extra
    assert loader.fallbacks == 0

    assert fresh.model_version == trained.model_version
    restored, saved = fresh.snapshot(), trained.snapshot()
    assert restored.event_seq == saved.event_seq and restored.pending == saved.pending
    assert restored.refresh_cursor == saved.refresh_cursor and restored.samples_shed == saved.samples_shed
    assert fresh.catalogue.ids == trained.catalogue.ids and fresh.catalogue.texts == trained.catalogue.texts
    assert fresh.users.user_ids() == trained.users.user_ids()
    np.testing.assert_array_equal(restored.published, saved.published)
    np.testing.assert_array_equal(fresh.item_vectors(), trained.item_vectors())
    np.testing.assert_array_equal(fresh.user_vectors(all_users(trained)), trained.user_vectors(all_users(trained)))
    assert torch.equal(torch.get_rng_state(), saved_rng)

    # Cached frozen features come back as they were (no re-encoding) and pooled ones too.
    assert len(fresh.features.frozen) == len(trained.features.frozen)
    for a, b in zip(fresh.features.frozen, trained.features.frozen):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))
    n = len(trained.features.frozen)
    assert torch.equal(fresh.features.pooled[:n], trained.features.pooled[:n])

    # Optimizer moments map to the same parameters by name; EWC and replay survive.
    old_opt, new_opt = optimizer_state_by_name(trained), optimizer_state_by_name(fresh)
    assert old_opt.keys() == new_opt.keys() and old_opt
    for name in old_opt:
        for key, value in old_opt[name].items():
            assert torch.equal(torch.as_tensor(new_opt[name][key]).cpu(), torch.as_tensor(value).cpu()), (name, key)
    old_ewc, new_ewc = trained.parts.ewc.state(), fresh.parts.ewc.state()
    assert old_ewc.keys() == new_ewc.keys() and old_ewc
    assert all(torch.equal(old_ewc[k], new_ewc[k]) for k in old_ewc)
    old_buf, new_buf = trained.parts.replay.storage_policy, fresh.parts.replay.storage_policy
    assert new_buf.seen_samples == old_buf.seen_samples > old_buf.max_size  # full: sampling has replaced some
    assert new_buf.filled == old_buf.filled == old_buf.max_size
    assert all(torch.equal(a, b) for a, b in zip(old_buf.tensors(), new_buf.tensors()))


def test_checkpoint_of_the_earlier_replay_format_loads(config, encoder, trained):
    """Before the tensor reservoir: ``reservoir_weights`` saved, no seen count; and a larger buffer than now."""
    data = parse(collect(trained, b"{}"))
    saved = data["replay.safetensors"]
    n = len(saved["item_rows"])
    data["replay.safetensors"] = {**saved, "hist_rows": saved["hist_rows"].long(),  # int64 then
                                  "reservoir_weights": torch.rand(n).sort(descending=True).values}
    data["state.json"]["replay"] = {"samples": n, "seen_samples": None}
    smaller = ContinualRecommender(replace(config, replay_size=n - 56), encoder=encoder)
    apply(data, smaller)
    policy = smaller.parts.replay.storage_policy
    assert policy.filled == n - 56 and policy.seen_samples == n
    saved_tensors = trained.parts.replay.storage_policy.tensors()
    assert all(torch.equal(a, b[:n - 56]) for a, b in zip(policy.tensors(), saved_tensors))
    for event in EVENTS[400:460]:
        smaller.observe(event)
    assert smaller.learn() is not None and policy.filled == n - 56 and policy.seen_samples > n


def test_checkpoint_without_the_items_evidence_loads_with_it_empty(config, encoder, trained):
    """Before the items' evidence (learners.statistics.item_evidence) was kept: no ``evidence`` tensor."""
    data = parse(collect(trained, b"{}"))
    data["learner.safetensors"] = {k: v for k, v in data["learner.safetensors"].items() if k != "evidence"}
    fresh = ContinualRecommender(config, encoder=encoder)
    apply(data, fresh)
    assert fresh.model.evidence.shape == trained.model.evidence.shape and not fresh.model.evidence.any()
    assert torch.equal(fresh.model.popularity, trained.model.popularity)
    assert not fresh.model.conversion().any() and not fresh.model.newness().any()  # known items: neutral
    for event in EVENTS[400:460]:
        fresh.observe(event)
    assert fresh.learn() is not None and fresh.model.newness().max() > 0


def test_restored_learner_keeps_training_like_the_original(tmp_path, config, encoder):
    original = train_learner(config, encoder)
    store = CheckpointStore(tmp_path / "state")
    store.save(original, {})
    restored = ContinualRecommender(config, encoder=encoder)
    store.load_latest(restored)
    version = original.model_version

    reports = []
    for learner in (original, restored):
        torch.manual_seed(123)  # same negatives and shuffles for both
        for event in EVENTS[400:460]:
            learner.observe(event)
        report = learner.learn()
        assert report is not None and math.isfinite(report.loss) and report.model_version == version + 1
        reports.append(report)
    assert reports[0].loss == pytest.approx(reports[1].loss, rel=1e-5)
    # The reservoir's draws depend on its seen count only: both kept the same samples.
    kept = [learner.parts.replay.storage_policy for learner in (original, restored)]
    assert kept[0].seen_samples == kept[1].seen_samples
    assert all(torch.equal(a, b) for a, b in zip(kept[0].tensors(), kept[1].tensors()))
    np.testing.assert_allclose(restored.item_vectors(), original.item_vectors(), atol=1e-5)
    users = all_users(original)
    np.testing.assert_allclose(restored.user_vectors(users), original.user_vectors(users), atol=1e-5)
    # And a second experience on the restored one: the optimizer keeps working with Avalanche's mapping.
    for event in EVENTS[:60]:
        restored.observe(event)
    assert math.isfinite(restored.learn().loss) and restored.model_version == version + 2


# -- the Hugging Face export --------------------------------------------------------

def test_model_folder_loads_with_auto_model_and_holds_the_trained_top(tmp_path, config, trained):
    from transformers import AutoModel, AutoTokenizer

    path = CheckpointStore(tmp_path / "state").save(trained, {})
    exported = AutoModel.from_pretrained(path / "model", local_files_only=True)
    assert AutoTokenizer.from_pretrained(path / "model", local_files_only=True)("a film").input_ids
    base = trained.encoder.model
    last, base_last = exported.encoder.layer[-1].state_dict(), base.encoder.layer[-1].state_dict()
    top = trained.top.layers[-1].state_dict()
    assert last.keys() == top.keys()
    assert all(torch.equal(last[k], top[k].cpu()) for k in top)
    assert any(not torch.equal(top[k].cpu(), base_last[k].cpu()) for k in top)  # training moved it
    first, base_first = exported.encoder.layer[0].state_dict(), base.encoder.layer[0].state_dict()
    assert all(torch.equal(first[k], base_first[k].cpu()) for k in first)


# -- torn and corrupt checkpoints -------------------------------------------------------

def _newest(state: Path) -> Path:
    return CheckpointStore(state).checkpoints()[0]


def _delete_file(state):
    (_newest(state) / "users.safetensors").unlink()


def _truncate_file(state):
    path = _newest(state) / "learner.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def _truncate_model_weights(state):
    # The trained shard: the frozen one is a hard link shared with the previous checkpoint,
    # written once and never again, so no torn write can reach it.
    path = _newest(state) / "model" / TRAINED_SHARD
    os.truncate(path, path.stat().st_size - 1)


def _flip_a_byte(state):
    path = _newest(state) / "features.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_manifest(state):
    path = _newest(state) / MANIFEST
    path.write_bytes(path.read_bytes()[:-40])


def _manifest_edited(state):
    path = _newest(state) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"]["state.json"]["size"] += 1
    path.write_text(json.dumps(manifest))


def _no_manifest(state):
    (_newest(state) / MANIFEST).unlink()


@pytest.mark.parametrize("damage", [_delete_file, _truncate_file, _truncate_model_weights, _flip_a_byte,
                                    _corrupt_manifest, _manifest_edited, _no_manifest],
                         ids=lambda f: f.__name__.strip("_"))
def test_torn_checkpoint_falls_back_to_the_previous_one(tmp_path, config, encoder, two_checkpoints, damage,
                                                        caplog):
    template, older_version, _ = two_checkpoints
    state = tmp_path / "state"
    shutil.copytree(template, state)
    torn = _newest(state)
    damage(state)
    learner = ContinualRecommender(config, encoder=encoder)
    store = CheckpointStore(state)
    with caplog.at_level(logging.WARNING, logger="learners.checkpoint"):
        extra = store.load_latest(learner)
    assert extra["which"] == "older" and learner.model_version == older_version
    assert store.fallbacks == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(torn.name in message for message in warnings), warnings
    # The restored learner is usable, and the next save replaces the torn folder.
    assert np.isfinite(learner.user_vectors(["user-1"])).all()
    store.save(learner, {"which": "after"})
    assert CheckpointStore(state).load_latest(ContinualRecommender(config, encoder=encoder))["which"] == "after"


def test_leftover_tmp_folder_is_ignored_and_cleaned(tmp_path, config, encoder, two_checkpoints):
    template, _, newer_version = two_checkpoints
    state = tmp_path / "state"
    shutil.copytree(template, state)
    stale = state / f".tmp-{newer_version + 1}-999999999"  # a writer that died mid-way
    shutil.copytree(_newest(state), stale)
    (stale / MANIFEST).unlink()
    (stale / "learner.safetensors").write_bytes(b"half")
    learner = ContinualRecommender(config, encoder=encoder)
    store = CheckpointStore(state)
    assert store.load_latest(learner)["which"] == "newer"
    assert store.fallbacks == 0 and learner.model_version == newer_version
    store.save(learner, {"which": "again"})
    assert not stale.exists()


def test_all_checkpoints_torn_is_an_error_not_a_silent_fresh_start(tmp_path, config, encoder, two_checkpoints):
    template, _, _ = two_checkpoints
    state = tmp_path / "state"
    shutil.copytree(template, state)
    for path in CheckpointStore(state).checkpoints():
        (path / MANIFEST).unlink()
    store = CheckpointStore(state)
    with pytest.raises(CheckpointError, match="torn or corrupt"):
        store.load_latest(ContinualRecommender(config, encoder=encoder))
    assert store.fallbacks == 2


def test_empty_state_dir_loads_nothing(tmp_path, config, encoder):
    store = CheckpointStore(tmp_path / "nothing-here")
    learner = ContinualRecommender(config, encoder=encoder)
    assert store.load_latest(learner) is None and store.fallbacks == 0
    assert learner.model_version == 0


# -- pruning ---------------------------------------------------------------------

def test_keep_prunes_old_checkpoints(tmp_path, trained):
    store = CheckpointStore(tmp_path / "state", keep=2)
    paths = [store.save(trained, {"n": n}) for n in range(4)]
    assert len(set(paths)) == 4  # same model version, distinct folders
    assert store.checkpoints() == [paths[3], paths[2]]
    assert not paths[0].exists() and not paths[1].exists()
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == sorted(p.name for p in paths[2:])



def test_what_a_peer_holds_for_the_same_version_is_linked_not_written(tmp_path, trained):
    """--distributed: rank 1's checkpoint holds rank 0's copy of every file the two share."""
    theirs = CheckpointStore(tmp_path / "rank-0").save(trained, {"rank": 0})
    store = CheckpointStore(tmp_path / "rank-1", peer=tmp_path / "rank-0")
    ours = store.write(store.prepare(trained, {"rank": 1}), peer_wait_s=1.0)
    mine, rank0 = read_manifest(ours), read_manifest(theirs)
    shared = sorted(name for name, entry in mine.items() if rank0.get(name) == entry)
    assert "learner.safetensors" in shared and f"model/{TRAINED_SHARD}" in shared and "extra.json" not in shared
    assert all(os.path.samefile(ours / name, theirs / name) for name in shared)
    verify(ours)  # complete and intact on its own
    assert store.last_linked_bytes >= sum(mine[name]["size"] for name in shared)


def test_remove_older_keeps_only_the_newest_and_refuses_an_incomplete_one(tmp_path, trained):
    store = CheckpointStore(tmp_path / "state")
    paths = [store.save(trained, {"n": n}) for n in range(3)]
    (paths[2] / MANIFEST).unlink()  # torn: the older ones must stay
    with pytest.raises(CheckpointError):
        store.remove_older(paths[2])
    assert store.checkpoints() == paths[::-1]
    assert store.remove_older(paths[1]) == [paths[0]]
    assert store.checkpoints() == [paths[2], paths[1]]
    assert store.latest_extra() == {"n": 1}  # the torn one is skipped, the kept one loads


def test_load_version_restores_that_version_and_remove_newer_drops_what_came_after(tmp_path, config, encoder,
                                                                                  two_checkpoints):
    """--distributed start-up: a rank goes back to the newest version every rank has complete."""
    template, older_version, newer_version = two_checkpoints
    state = tmp_path / "state"
    shutil.copytree(template, state)
    store = CheckpointStore(state)
    assert store.complete_versions() == sorted({older_version, newer_version})
    learner = ContinualRecommender(config, encoder=encoder)
    assert store.load_version(learner, older_version)["which"] == "older"
    assert learner.model_version == older_version and store.last_path == store.checkpoints()[-1]
    newest = store.checkpoints()[0]
    assert store.remove_newer(store.last_path) == [newest] and store.checkpoints() == [store.last_path]
    assert store.load_latest(ContinualRecommender(config, encoder=encoder))["which"] == "older"
    with pytest.raises(CheckpointError, match=f"model version {newer_version}"):
        store.load_version(ContinualRecommender(config, encoder=encoder), newer_version)
    (store.last_path / MANIFEST).unlink()  # torn: not complete, and not loaded as that version either
    assert store.complete_versions() == []
    with pytest.raises(CheckpointError, match="torn or corrupt"):
        store.load_version(ContinualRecommender(config, encoder=encoder), older_version)


# -- settings and input errors ------------------------------------------------------------

@pytest.mark.parametrize("change", [{"vector_dim": 16}, {"history_length": 8}])
def test_config_mismatch_refuses_to_load(tmp_path, config, encoder, trained, change):
    store = CheckpointStore(tmp_path / "state")
    store.save(trained, {})
    other = ContinualRecommender(replace(config, **change), encoder=encoder)
    with pytest.raises(CheckpointError, match="--state-dir") as info:
        store.load_latest(other)
    assert next(iter(change)) in str(info.value)
    assert other.model_version == 0


def test_other_model_path_is_a_mismatch_but_a_spelling_of_the_same_is_not(tmp_path, config, encoder, trained):
    store = CheckpointStore(tmp_path / "state")
    store.save(trained, {})
    same = ContinualRecommender(replace(config, model_path=config.model_path + "/"), encoder=encoder)
    assert store.load_latest(same) == {}
    copy = tmp_path / "model-copy"
    shutil.copytree(config.model_path, copy)
    with pytest.raises(CheckpointError, match="model_path"):
        store.load_latest(ContinualRecommender(replace(config, model_path=str(copy)), encoder=encoder))


def test_extra_that_is_not_json_fails_cleanly(tmp_path, trained):
    store = CheckpointStore(tmp_path / "state")
    with pytest.raises(CheckpointError, match="JSON"):
        store.save(trained, {"offsets": {("events", 0): 5}})
    assert issubclass(CheckpointError, RecstreamError)
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_round_trip_without_trained_layers_or_ewc_and_replay(tmp_path, config):
    """train_layers 0 caches pooled vectors instead of token states; naive has no EWC / replay state."""
    from transformers import AutoModel

    small = replace(config, train_layers=0, strategy="naive")
    learner = train_learner(small)
    path = CheckpointStore(tmp_path / "state").save(learner, {"k": 1})
    restored = ContinualRecommender(small, encoder=learner.encoder)
    assert CheckpointStore(tmp_path / "state").load_latest(restored) == {"k": 1}
    np.testing.assert_array_equal(restored.item_vectors(), learner.item_vectors())
    users = all_users(learner)
    np.testing.assert_array_equal(restored.user_vectors(users), learner.user_vectors(users))
    assert all((a is None and b is None) or torch.equal(a, b)
               for a, b in zip(restored.features.frozen, learner.features.frozen))
    for event in EVENTS[400:460]:
        restored.observe(event)
    assert math.isfinite(restored.learn().loss)
    exported = AutoModel.from_pretrained(path / "model", local_files_only=True).state_dict()
    base = learner.encoder.model.state_dict()
    assert exported.keys() == base.keys() and all(torch.equal(exported[k], base[k]) for k in base)


def test_round_trip_of_a_lora_learner(tmp_path, config):
    """LoRA adapters (frozen base weights shared with the encoder) restore exactly and keep training."""
    from transformers import AutoModel

    lora = replace(config, train_params="lora", lora_rank=4)
    learner = train_learner(lora)
    path = CheckpointStore(tmp_path / "state").save(learner, {})
    restored = ContinualRecommender(lora, encoder=learner.encoder)
    CheckpointStore(tmp_path / "state").load_latest(restored)
    np.testing.assert_array_equal(restored.item_vectors(), learner.item_vectors())
    users = all_users(learner)
    np.testing.assert_array_equal(restored.user_vectors(users), learner.user_vectors(users))
    old_opt, new_opt = optimizer_state_by_name(learner), optimizer_state_by_name(restored)
    assert old_opt.keys() == new_opt.keys() and any("lora" in name for name in old_opt)
    for event in EVENTS[400:460]:
        restored.observe(event)
    assert math.isfinite(restored.learn().loss)
    exported = AutoModel.from_pretrained(path / "model", local_files_only=True)
    assert not any("lora" in key for key in exported.state_dict())  # merged into plain weights
    with pytest.raises(CheckpointError, match="lora_rank"):
        CheckpointStore(tmp_path / "state").load_latest(
            ContinualRecommender(replace(lora, lora_rank=8), encoder=None))
