"""What a new user sees at start: no library noise they cannot act on, and a demo that says
where it is, how to query it, and keeps its expected restart notice calm."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from stream.config import Settings
from stream.demo import banner
from worker_fakes import TP0, consumer_record, event_bytes, make_worker

ROOT = Path(__file__).resolve().parents[1]

_BUILD_A_LEARNER = """
import warnings
from learners.quiet import silence_library_warnings
silence_library_warnings()
from learners.learner import ContinualRecommender, LearnerConfig
from stream.config import default_model_path
ContinualRecommender(LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=16, negatives=8))
warnings.warn("a warning of our own still shows")
"""


def test_start_up_prints_no_library_noise():
    """qpsolvers' solver advice, Avalanche's "No loggers specified" and the weight-loading bar are
    gone; any other warning still shows."""
    out = subprocess.run([sys.executable, "-W", "default", "-c", _BUILD_A_LEARNER], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=300)
    assert "no QP solver" not in out.stderr
    assert "No loggers specified" not in out.stderr
    assert "Loading weights" not in out.stderr
    assert "a warning of our own still shows" in out.stderr


def test_the_demo_banner_names_the_broker_topics_ids_and_a_ready_topk_command():
    settings = Settings(bootstrap_servers="127.0.0.1:40123", demo_users=7, demo_items=9)
    text = banner(settings)
    assert "127.0.0.1:40123" in text and "user-0..user-6" in text and "item-0..item-8" in text
    assert all(topic in text for topic in ("events", "items", "vectors", "events.dlq"))
    assert "recstream topk --user user-0 --bootstrap-servers 127.0.0.1:40123" in text
    assert "--vectors-topic vec2" in banner(settings.model_copy(update={"vectors_topic": "vec2"}))
    assert len(text.splitlines()) <= 6


def test_a_recreated_topic_on_the_demo_broker_is_one_info_line(tmp_path, caplog):
    """The worker's own path for a log that ends below the applied offsets, on the demo's broker."""
    recreated = {TP0: [consumer_record(o, event_bytes(100 + o)) for o in range(0, 2)]}
    worker, consumer, _ = make_worker(tmp_path, [recreated, recreated], fresh_broker=True)
    with caplog.at_level(logging.INFO, logger="stream.worker"):
        for partition_offset in (5, 9):  # the same note twice (as for a second partition)
            worker.ingest.apply_offset(("events", 0), partition_offset)
            consumer.highwaters[TP0] = 2
            worker.turn()
    notes = [r for r in caplog.records if "embedded broker started empty" in r.getMessage()]
    assert [r.levelname for r in notes] == ["INFO"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [e.event_id for e in worker.learner.observed][:2] == ["e100", "e101"]  # read as new, as before


def test_without_the_demo_a_recreated_topic_stays_an_error(tmp_path, caplog):
    recreated = {TP0: [consumer_record(o, event_bytes(100 + o)) for o in range(0, 2)]}
    worker, consumer, _ = make_worker(tmp_path, [recreated])
    worker.ingest.apply_offset(("events", 0), 5)
    consumer.highwaters[TP0] = 2
    with caplog.at_level(logging.INFO, logger="stream.worker"):
        worker.turn()
    assert [r.levelname for r in caplog.records if "deleted and created again" in r.getMessage()] == ["ERROR"]
