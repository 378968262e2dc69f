"""Two gloo ranks train one model: identical after every round, equal to one process."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learners.learner import ContinualRecommender, LearnerConfig
from learners.synthetic import SyntheticWorld
from stream.config import default_model_path

ROUNDS = 3


def _config() -> LearnerConfig:
    # Full softmax and every text through the top: a step's loss has no sampling, so one
    # process and two ranks over the same minibatch take the same step. No popularity
    # coordinates: a round counts the group's events rank after rank, not in stream order,
    # so decayed counts (not the weights) differ slightly from one process's.
    return LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=16, history_length=8,
                         batch_size=512, strategy="ewc", full_softmax=True, text_batch=0, seed=3,
                         popularity_weight=0.0)


def _rounds(world: SyntheticWorld) -> list[list]:
    events = list(world.events(240))
    return [events[i * 80:(i + 1) * 80] for i in range(ROUNDS)]


def _params(learner: ContinualRecommender) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in learner.model.parameters() if p.requires_grad])


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from learners.distributed import Collective

    world = SyntheticWorld(n_items=30, n_users=6)
    learner = ContinualRecommender(_config(), collective=Collective())
    learner.add_items(world.items())
    for k, events in enumerate(_rounds(world)):
        mine = [e for e in events if int(e.user_id.split("-")[1]) % 2 == rank]
        if k == 2 and rank == 1:
            mine = []  # a rank with nothing pending still takes part
        learner.observe_many(mine)
        report = learner.learn()
        assert report is not None and report.model_version == k + 1
        params = _params(learner)
        gathered = [torch.empty_like(params) for _ in range(2)]
        dist.all_gather(gathered, params)
        assert torch.equal(gathered[0], gathered[1]), f"ranks differ after round {k}"
    # Each rank holds the histories of its own users (user-<rank> here).
    torch.save({"params": _params(learner), "user": learner.user_vectors([f"user-{rank}"])},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_stay_identical_and_match_one_process(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    world = SyntheticWorld(n_items=30, n_users=6)
    single = ContinualRecommender(_config())
    single.add_items(world.items())
    for k, events in enumerate(_rounds(world)):
        if k == 2:
            events = [e for e in events if int(e.user_id.split("-")[1]) % 2 == 0]
        single.observe_many(events)
        single.learn()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    torch.testing.assert_close(ranks[0]["params"], _params(single), atol=2e-5, rtol=1e-4)
    for r in range(2):
        np.testing.assert_allclose(ranks[r]["user"], single.user_vectors([f"user-{r}"]), atol=1e-4)
