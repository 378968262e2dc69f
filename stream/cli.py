"""The ``recstream`` command.

Worker flags are generated from ``Settings``: every field is ``--field-name``
and ``RECSTREAM_FIELD_NAME``, and a flag left out falls back to the variable,
then to the default.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
import typing
from pathlib import Path

import click
from pydantic import ValidationError

# Only light modules here: --help and argument errors answer before torch is imported.
from learners.errors import RecstreamError
from learners.quiet import silence_library_warnings
from stream.config import DEMO_STATE_DIR, LEARNER_SETTINGS, Settings
from stream.kafka.connection_noise import quiet_connection_noise


def _settings_options(func, only: typing.Optional[typing.Collection[str]] = None):
    """One click option per Settings field, or per field in ``only`` (default None: pydantic
    reads the env)."""
    for name, field in reversed(list(Settings.model_fields.items())):
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        env = "RECSTREAM_" + name.upper()
        annotation = field.annotation
        origin_args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            kind = click.Choice(origin_args)
        elif annotation in (int, float):
            kind = annotation
        elif annotation is bool:
            kind = bool
        else:
            kind = str
        help_text = f"{field.description or ''} [env {env}; default {field.default!r}]"
        func = click.option(flag, name, type=kind, default=None, help=help_text)(func)
    return func


def _default(name: str):
    """A Settings default, for the commands whose flags are written by hand (one default per setting)."""
    return Settings.model_fields[name].default


def _make_settings(options: dict) -> Settings:
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise click.UsageError(_validation_message(exc)) from None


def _validation_message(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "?"
        lines.append(f"--{name.replace('_', '-')} / RECSTREAM_{name.upper()}: {err['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def _logging(level: str) -> None:
    # Under torchrun every rank writes to the same output: say which one wrote a line.
    rank = f" rank {os.environ.get('RANK', '?')}" if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s %(name)s{rank}: %(message)s")
    for noisy in ("kafka", "avalanche", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # While Kafka is unreachable this repeats many times a second; the worker says it once per retry.
    logging.getLogger("kafka.cluster").setLevel(logging.ERROR)


@click.group()
def main() -> None:
    """recstream: streaming continual learning of user and item vectors from Kafka events."""
    silence_library_warnings()  # before any command imports the libraries


@main.command()
@_settings_options
def worker(**options) -> None:
    """Run the long-running worker until SIGTERM/SIGINT.

    Without --bootstrap-servers it starts the embedded broker and feeds it a
    synthetic stream (the demo); with it, it uses exactly that cluster.
    """
    settings = _make_settings(options)
    _logging(settings.log_level)
    quiet_connection_noise(settings.bootstrap_servers)  # one line per Kafka outage, not one per attempt
    try:
        sys.exit(_run_worker(settings))
    except RecstreamError as exc:
        raise click.ClickException(str(exc)) from None


def _run_worker(settings: Settings) -> int:
    app = None
    broker = feeder = None

    def on_signal(*_) -> None:
        if app is None:  # still importing, loading the model or starting the demo
            # Nothing was read and nothing written, so nothing is lost. Exit here, not by
            # raising: an exception raised inside a signal handler can land in a C++
            # extension mid-import (torch), which then aborts the process.
            logging.getLogger("recstream").info("stopped during start-up, before reading anything")
            if broker is not None:
                broker.stop()
            logging.shutdown()
            os._exit(0)
        app.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):  # first: loading the model takes seconds
        signal.signal(sig, on_signal)
    from learners.synthetic import SyntheticWorld
    from stream.worker import Worker

    group = None
    if settings.distributed:
        from stream.distributed_setup import start_group
        from stream.worker.group_turns import GroupTurns

        _, collective, settings = start_group(settings)
        group = GroupTurns(collective)
    if settings.bootstrap_servers is None:
        from stream.demo import DemoFeeder, start_embedded

        broker, bootstrap = start_embedded(settings)
        update = {"bootstrap_servers": bootstrap}
        if "state_dir" not in settings.model_fields_set:  # the demo's state stays apart from a real stream's
            update["state_dir"] = DEMO_STATE_DIR
        settings = settings.model_copy(update=update)
        world = SyntheticWorld(n_items=settings.demo_items, n_users=settings.demo_users, seed=settings.seed)
        feeder = DemoFeeder(bootstrap, settings, world, rate_per_s=settings.demo_rate)
    app = Worker(settings, fresh_broker=feeder is not None, group=group)
    app.connect()  # returns early on stop(), and run() then closes
    if feeder is not None:
        from stream.demo import banner

        feeder.start()
        click.echo(banner(settings), err=True)
    try:
        return app.run()
    finally:
        if feeder is not None:
            feeder.stop()
        if broker is not None:
            broker.stop()
        if group is not None:
            from stream.distributed_setup import leave_group

            leave_group()


@main.command()
@click.option("--events", "events_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--items", "items_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--blocks", default=None, type=int,
              help="blocks P1 cuts the stream into  [default: 10; 18 with --scenario recurring]")
@click.option("--k", default=10, show_default=True, type=int)
@click.option("--strategies", default="popularity,decayed_pop,ease,ease_rw,frozen,naive,ewc,replay,ewc_replay,joint", show_default=True,
              help="comma-separated strategy names")
@click.option("--scenario", default="time", show_default=True,
              type=click.Choice(["time", "genre-epochs", "recurring"]),
              help="event order: time = the stream as it happened; genre-epochs = one genre group after "
                   "another (a drift scenario for forgetting); recurring = three genre groups in three "
                   "rounds, scored for retention and plasticity")
@click.option("--joint-epochs", default=2, show_default=True, type=click.IntRange(1),
              help="epochs of the joint reference over all events so far, at every block")
@click.option("--joint-batch-size", default=512, show_default=True, type=click.IntRange(1),
              help="minibatch of the joint reference (an offline retrain; larger is cheaper per sample)")
@functools.partial(_settings_options, only={*LEARNER_SETTINGS, "model", "experience_size", "torch_threads"})
def evaluate(events_path, items_path, out_path, blocks, k, strategies, scenario, joint_epochs, joint_batch_size,
             **learner_options) -> None:
    """Protocol P1 and P1-cold on offline files; writes the results JSON plus PNG plots and a Markdown table.

    Files, protocol and results file: docs/formats.md.

    The learner flags are the worker's own (same names, variables and defaults): what is
    measured is the learner ``recstream worker`` would run with them."""
    from learners.evaluation.runner import evaluate as run_evaluation
    from learners.evaluation.strategies import make_factory
    from stream.learner_setup import learner_config

    _logging("INFO")
    settings = _make_settings(learner_options)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    factory = make_factory(learner_config(settings), experience_size=settings.experience_size,
                           joint_epochs=joint_epochs, joint_batch_size=joint_batch_size)
    try:
        results = run_evaluation(events_path, items_path, out_path, blocks=blocks, k=k,
                                 strategies=strategies.split(","), factory=factory, scenario=scenario)
    except RecstreamError as exc:
        raise click.ClickException(str(exc)) from None
    from learners.evaluation.report import markdown_table
    click.echo(markdown_table(results))


@main.group()
def convert() -> None:
    """Turn public data sets into offline files (events.jsonl, items.jsonl; docs/formats.md)."""


@convert.command("movielens")
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def convert_movielens_cmd(src_dir, out_dir) -> None:
    """A MovieLens release (ml-latest(-small), ml-1m/10m/20m/25m or ml-100k, found by its file names)
    -> events.jsonl + items.jsonl (ratings to event types: docs/formats.md)."""
    from learners.evaluation.movielens import convert_movielens

    try:
        summary = convert_movielens(src_dir, out_dir)
    except RecstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{summary.events} events -> {summary.events_path}\n{summary.items} items -> {summary.items_path}")


@main.command()
@click.option("--events", "events_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--items", "items_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--bootstrap-servers", envvar="RECSTREAM_BOOTSTRAP_SERVERS", required=True)
@click.option("--events-topic", envvar="RECSTREAM_EVENTS_TOPIC", default=_default("events_topic"), show_default=True)
@click.option("--items-topic", envvar="RECSTREAM_ITEMS_TOPIC", default=_default("items_topic"), show_default=True)
@click.option("--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)")
def replay(events_path, items_path, bootstrap_servers, events_topic, items_topic, rate) -> None:
    """Publish offline files to Kafka: items first (keyed by item_id), then events in file order (keyed by user_id)."""
    from stream.kafka.replay import replay_files

    sent = replay_files(bootstrap_servers, events_path, items_path, events_topic, items_topic, rate)
    click.echo(f"published {sent['items']} items and {sent['events']} events")


@main.command()
@click.option("--user", "user_id", required=True)
@click.option("--k", default=10, show_default=True, type=int)
@click.option("--bootstrap-servers", envvar="RECSTREAM_BOOTSTRAP_SERVERS", required=True)
@click.option("--vectors-topic", envvar="RECSTREAM_VECTORS_TOPIC", default=_default("vectors_topic"),
              show_default=True)
@click.option("--timeout", default=30.0, show_default=True, type=float, help="seconds to connect and read the topic")
@click.option("--diversity", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="0..1: re-rank by maximal marginal relevance over item-item cosine (0 = by score alone)")
@click.option("--explain", is_flag=True, help="for each pick, the user's history item (of those published with "
              "the user's vector) closest to it, and that cosine")
@click.option("--json", "as_json", is_flag=True, help="one JSON object: the picks and their intra-list similarity")
@click.option("--include-seen", is_flag=True, help="keep the items the user is known to have (those published "
              "with the user's vector: recent_items and because); by default they are left out")
def topk(user_id, k, bootstrap_servers, vectors_topic, timeout, diversity, explain, as_json, include_seen) -> None:
    """Top-K items for a user from the published vectors (what a downstream ranker sees), leaving out
    the items the user already has unless --include-seen."""
    import json

    from stream.vector_index import VectorIndex, open_consumer

    index = VectorIndex()
    deadline = time.monotonic() + timeout
    try:
        consumer = open_consumer(bootstrap_servers, vectors_topic, timeout_s=timeout)
    except (RecstreamError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        index.catch_up(consumer, timeout_s=max(0.0, deadline - time.monotonic()))
    finally:
        consumer.close()
    if index.user_vector(user_id) is None:
        raise click.ClickException(f"no vector for user {user_id!r} in {vectors_topic!r}")
    picks = index.topk(user_id, k=k, diversity=diversity, include_seen=include_seen)
    items = [item for item, _ in picks]
    reasons = index.explain(user_id, items) if explain else [None] * len(picks)
    if as_json:
        out = []
        for (item, score), reason in zip(picks, reasons):
            pick = {"item_id": item, "score": round(score, 6)}
            if explain:
                pick["because"] = None if reason is None else {"item_id": reason[0],
                                                               "similarity": round(reason[1], 6)}
            out.append(pick)
        click.echo(json.dumps({"picks": out, "intra_list_similarity": round(index.intra_list_similarity(items), 6)}))
        return
    for rank, ((item, score), reason) in enumerate(zip(picks, reasons), start=1):
        line = f"{rank}\t{item}\t{score:.4f}"
        if explain:
            line += "\t" + (f"because {reason[0]} ({reason[1]:.3f})" if reason else "-")
        click.echo(line)


@main.command()
@click.option("--user", "user_id", required=True, help="the user id, as in the events' user_id")
@click.option("--bootstrap-servers", envvar="RECSTREAM_BOOTSTRAP_SERVERS", required=True)
@click.option("--forget-topic", envvar="RECSTREAM_FORGET_TOPIC", default=_default("forget_topic"), show_default=True)
@click.option("--timeout", default=30.0, show_default=True, type=float,
              help="seconds to reach Kafka and have the request acknowledged")
def forget(user_id, bootstrap_servers, forget_topic, timeout) -> None:
    """Ask the workers to erase a user (the right to be forgotten): one record on the forget topic.

    Each worker drops the user's history and training samples, publishes a tombstone for the
    user's vector and checkpoints without them. The model weights are shared by every user:
    they are not per-user data and stay."""
    from stream.kafka.forget import send_forget

    try:
        partition, offset = send_forget(bootstrap_servers, forget_topic, user_id, timeout_s=timeout)
    except RecstreamError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"forget request for user {user_id!r} written to {forget_topic}[{partition}] at offset {offset}")


@main.command()
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True,
              help="where the learner runs (cuda: bf16 autocast in the training figure)")
@click.option("--seconds", default=600.0, type=float, show_default=True,
              help="length of the steady run (freshness, memory); every other phase scales with it")
@click.option("--bootstrap-servers", default=None,
              help="use this cluster (topics named recstream-bench-*, deleted after); default: embedded broker")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="results JSON")
@click.option("--users", default=10_000, type=int, show_default=True, help="distinct users of the main sections")
@click.option("--items", default=1_000, type=int, show_default=True, help="distinct items of the main sections")
@click.option("--rate", default=1000.0, type=float, show_default=True, help="events/s of the steady run")
@click.option("--producer-linger-ms", default=_default("producer_linger_ms"), type=int, show_default=True,
              help="linger.ms of the steady run's event producer, the worker's own by default (send time is "
                   "the clock's start, so it counts)")
@click.option("--scales", default="1000,100000", show_default=True,
              help="the scale section's sizes, comma-separated: N (N users and N items) or USERSxITEMS; "
                   "grid: 10,000 / 100,000 / 1,000,000 users x 1,000 / 10,000 / 100,000 items")
@click.option("--sections", default="ingest,training,freshness,scale", show_default=True,
              help="comma-separated subset of ingest, training, freshness (with memory), scale, and distributed "
                   "(training events/s, one process vs two gloo ranks; only when named)")
@click.option("--max-text-items", default=2_000, type=int, show_default=True,
              help="items that get a text (encoded); the others are id-only")
@click.option("--model", default=None, envvar="RECSTREAM_MODEL", help="local Hugging Face model folder")
@click.option("--seed", default=0, type=int, show_default=True)
def bench(device, seconds, bootstrap_servers, out_path, users, items, rate, producer_linger_ms, scales, sections,
          max_text_items, model, seed) -> None:
    """Measure ingest, training, freshness, memory and scale side by side; print a table, write JSON."""
    from stream.bench import BenchOptions, markdown_table, parse_scales, run_bench

    _logging("WARNING")
    try:
        options = BenchOptions(
            device=device, seconds=seconds, bootstrap_servers=bootstrap_servers, out=out_path, users=users,
            items=items, rate=rate, producer_linger_ms=producer_linger_ms,
            scales=parse_scales(scales),
            sections=tuple(x.strip() for x in sections.split(",") if x.strip()), max_text_items=max_text_items,
            model=model, seed=seed)
        results = run_bench(options, progress=lambda message: click.echo(message, err=True))
    except (RecstreamError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(markdown_table(results))
    click.echo(f"\nwritten to {out_path}")


if __name__ == "__main__":  # pragma: no cover
    main()
