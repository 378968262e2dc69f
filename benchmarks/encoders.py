"""Trained parameters, EWC state and training throughput per ``--train-params`` mode.

    python benchmarks/encoders.py                       # default model (all-MiniLM-L6-v2), CPU, 1 thread
    python benchmarks/encoders.py --events 600 --threads 2 --model /path/to/model

Each configuration builds a ``ContinualRecommender`` on the same model, adds a
synthetic catalogue (``learners.synthetic``), observes ``--events`` events and
learns one experience every ``--experience`` events. The first experience is a
warm-up and is not timed. Columns:

  encoder params   parameters of the text encoder that train (top layers / adapters)
  all trainable    everything the optimizer and EWC hold (projections and id tables included)
  EWC state        importances + anchors after training (OnlineFisherEWC.state_bytes)
  train samples/s  samples (replayed included) per second of ``strategy.train``
  learn samples/s  the same samples per second of the whole ``learn()`` (item refresh included)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from learners.towers.adapters import trainable_parameters  # noqa: E402
from learners.learner import ContinualRecommender, LearnerConfig  # noqa: E402
from learners.synthetic import SyntheticWorld  # noqa: E402

CONFIGS = (("top", 1), ("lora", 1), ("lora", 6), ("full", 0))


def measure(model_path: str, train_params: str, train_layers: int, args) -> dict:
    config = LearnerConfig(model_path=model_path, device=args.device, train_params=train_params,
                           train_layers=train_layers, max_text_tokens=args.max_tokens, batch_size=args.batch_size,
                           seed=0)
    world = SyntheticWorld(n_items=args.items, n_users=args.users, seed=0)
    started = time.perf_counter()
    learner = ContinualRecommender(config)
    learner.add_items(world.items())
    setup = time.perf_counter() - started
    samples = train_s = learn_s = 0.0
    experiences = 0
    for i, event in enumerate(world.events(args.events)):
        learner.observe(event)
        if (i + 1) % args.experience == 0:
            t0 = time.perf_counter()
            report = learner.learn()
            wall = time.perf_counter() - t0
            experiences += 1
            if experiences > 1:  # the first one warms up
                samples += report.samples
                train_s += report.seconds
                learn_s += wall
    ewc = learner.parts.ewc
    return {
        "mode": f"{train_params}" + (f" (train_layers={learner.encoder.train_layers})"),
        "encoder_params": trainable_parameters(learner.top),
        "all_trainable": trainable_parameters(learner.model),
        "ewc_bytes": ewc.state_bytes() if ewc is not None else 0,
        "train_sps": samples / train_s if train_s else float("nan"),
        "learn_sps": samples / learn_s if learn_s else float("nan"),
        "setup_s": setup,
        "timed_samples": int(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the box is shared)")
    parser.add_argument("--events", type=int, default=600)
    parser.add_argument("--experience", type=int, default=200, help="events per learned experience")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--only", default=None, help="comma-separated subset, e.g. top:1,lora:6,full:0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.model is None:
        from stream.config import default_model_path

        args.model = default_model_path()
    configs = CONFIGS
    if args.only:
        configs = tuple((part.split(":")[0], int(part.split(":")[1])) for part in args.only.split(","))
    rows = [measure(args.model, mode, layers, args) for mode, layers in configs]
    print(f"model {args.model}; device {args.device}, {args.threads} thread(s); {args.events} events, "
          f"{args.experience} per experience (first untimed), batch {args.batch_size}, {args.max_tokens} tokens, "
          f"torch {torch.__version__}")
    print("| mode | encoder params trained | all trainable | EWC state | train samples/s | learn samples/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['encoder_params']:,} | {r['all_trainable']:,} | {r['ewc_bytes'] / 2**20:.2f} MiB "
              f"| {r['train_sps']:.0f} | {r['learn_sps']:.0f} |")


if __name__ == "__main__":
    main()
