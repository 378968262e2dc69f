"""Building the worker's learner from ``Settings``, and torch's thread count for the worker."""

from __future__ import annotations

import logging
import os
import sys

import torch

from learners.config import LearnerConfig
from stream.config import LEARNER_SETTINGS, Settings

log = logging.getLogger("stream.worker")

_SWITCH_INTERVAL_S = 0.001


def set_torch_threads(settings: Settings) -> None:
    """With background training, leave one core to the loop and Kafka's I/O threads: torch's
    OpenMP threads spin, and with one on every core they and the loop fight for all of them,
    slowing training and the loop alike (docs/performance.md)."""
    threads = settings.torch_threads
    if not threads and settings.background_training:
        threads = max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") \
            else max(1, (os.cpu_count() or 2) - 1)
    if threads and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        log.info("torch intra-op threads: %d", threads)
    if settings.background_training:
        # The loop releases the GIL at every socket call and must win it back from the trainer
        # thread, which holds it between torch ops: with the default 5 ms switch interval each
        # of those waits could cost the loop 5 ms.
        sys.setswitchinterval(_SWITCH_INTERVAL_S)


def learner_config(settings: Settings) -> LearnerConfig:
    """The learner ``settings`` describe: its fields were derived from ``LearnerConfig``, so they map one to one."""
    values = settings.model_dump(include=set(LEARNER_SETTINGS))
    targets = [name.strip() for name in (settings.lora_targets or "").split(",") if name.strip()]
    values["lora_targets"] = tuple(targets) or None  # comma-separated text in the flag
    return LearnerConfig(model_path=settings.model_path(), **values)
