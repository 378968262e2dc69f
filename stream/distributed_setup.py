"""``--distributed``: the process group from torchrun's environment, and each rank's settings.

torch.distributed is imported only here, and only when ``--distributed`` is given, so
``recstream --help`` and a single worker never load it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from learners.errors import ConfigError
from stream.config import Settings

log = logging.getLogger("stream.worker")

# What torchrun (and any other launcher of torch.distributed's env:// rendezvous) sets per rank.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int
    backend: str


def rank_of_env(env=None) -> Rank:
    """This process's rank from torchrun's environment; a ``ConfigError`` saying how to launch otherwise."""
    env = os.environ if env is None else env
    missing = [name for name in TORCHRUN_ENV if not env.get(name)]
    if missing:
        raise ConfigError(
            f"--distributed needs torchrun's environment ({', '.join(missing)} not set): launch the workers "
            "with torchrun, e.g. `torchrun --nproc-per-node=2 -m stream.cli worker --distributed true ...`, "
            "or leave out --distributed / RECSTREAM_DISTRIBUTED to run one worker on its own")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError as exc:
        raise ConfigError(f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers: {exc}") from None
    return Rank(rank, world, local, backend="")


def rank_state_dir(state_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` of a group started with ``--state-dir state_dir`` keeps its checkpoints."""
    return state_dir / f"rank-{rank}"


def rank_settings(settings: Settings, rank: Rank) -> Settings:
    """Each rank's own state dir and metrics port; training between polls (see ``start_group``)."""
    if settings.bootstrap_servers is None:
        raise ConfigError("--distributed needs a Kafka cluster (--bootstrap-servers): the embedded demo broker "
                          "would be one broker per rank")
    if settings.background_training:
        log.info("--distributed: training between polls (collective rounds run on the loop thread)")
    update = {"state_dir": rank_state_dir(settings.state_dir, rank.rank), "background_training": False}
    if settings.metrics_port:
        update["metrics_port"] = settings.metrics_port + rank.local_rank
    return settings.model_copy(update=update)


def start_group(settings: Settings):
    """Join the process group torchrun describes; returns (``Rank``, ``Collective``, this rank's settings).

    NCCL when the learner runs on CUDA, gloo otherwise. Background training is off: the
    training round's collectives and the loop's per-turn agreement (stream/worker/group_turns.py)
    must reach every rank in the same order, which one thread guarantees."""
    rank = rank_of_env()
    import torch
    import torch.distributed as dist

    from learners.continual.distributed import Collective

    cuda = settings.device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = "cpu"
    if cuda:
        torch.cuda.set_device(rank.local_rank)
        device = f"cuda:{rank.local_rank}"
    if not dist.is_initialized():
        store, rank_id, world = _attempt_store()
        dist.init_process_group(backend, store=store, rank=rank_id, world_size=world)
    rank = Rank(rank.rank, rank.world_size, rank.local_rank, backend)
    log.info("rank %d of %d (%s)", rank.rank, rank.world_size, backend)
    return rank, Collective(device), rank_settings(settings, rank)


def _attempt_store():
    """torchrun's env:// store; the agent's shared store with its keys prefixed by the restart attempt.

    By default the elastic agent lends its rendezvous store to the ranks, one store for all
    attempts: after a restart, the process group's keys of the dead attempt (each rank's gloo
    address) are still there, and ranks reading them connect to ports nobody listens on any
    more (a hang or a failed restart). With ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (which the
    elastic c10d rendezvous needs, see ``docs/operating.md``) rank 0 serves a new store in every
    round, and the ranks of one round may count different restarts (an agent that joined later
    has restarted less): no prefix then."""
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    store, rank, world = next(dist.rendezvous("env://", timeout=default_pg_timeout))
    store.set_timeout(default_pg_timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return store, rank, world
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"recstream/attempt-{attempt}", store), rank, world


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
