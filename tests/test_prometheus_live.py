"""A real Prometheus scrapes a real worker fed by the embedded broker, and every
dashboard and alert expression is evaluated against what it scraped: a renamed
metric breaks this test, not a dashboard."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from learners.synthetic import SyntheticWorld
from stream.kafka.broker import EmbeddedBroker
from promql import alert_expressions, dashboard_panel_expressions
from worker_harness import WorkerProcess, free_port, make_topics, produce, produce_events, produce_items

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "recstream.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# Series from kafka-exporter, which this test does not run.
EXTERNAL = ("kafka_",)
_SELECTOR = re.compile(r"\b((?:recstream|process)_[a-z_]+|up)\b(\{[^}]*\})?")


def _query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _selectors(expr: str) -> list[str]:
    """The worker's series an expression reads (kafka-exporter's are not matched)."""
    return [name + labels for name, labels in _SELECTOR.findall(expr)]


@pytest.fixture
def prometheus(tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian's prometheus package is not installed (apt-get install prometheus)")
    return binary


def test_every_dashboard_and_alert_expression_returns_worker_data(tmp_path, prometheus):
    # A broker of its own: the alert rules name the default topics ("events").
    with EmbeddedBroker() as broker:
        _run_against(broker, tmp_path, prometheus)


def _run_against(broker, tmp_path, prometheus):
    names = iter(["events", "items", "vectors", "events.dlq", "recstream", "forget", "events.changelog"])
    topics = make_topics(broker.bootstrap, lambda _prefix: next(names))
    world = SyntheticWorld(n_items=80, n_users=40, seed=5)
    produce_items(broker.bootstrap, topics.items, world.items())
    worker = WorkerProcess(broker.bootstrap, topics, tmp_path / "state", tmp_path / "worker.log",
                           experience_size=128, checkpoint_interval_s=3, max_experience_wait_s=1,
                           batch_size=64, negatives=64)
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: recstream\n    static_configs: [{{targets: ['127.0.0.1:{worker.port}']}}]\n")
    prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()

    # One stream going on (not the same 40 events again): users meet items new to them, which the
    # online scorers rank.
    stream = world.events(10**7, start_ts=time.time(), id_prefix="live")

    def feed():  # a steady trickle, so rates and histograms have data in every window
        batch = 0
        while not stop.is_set():
            events = list(itertools.islice(stream, 40))
            produce_events(broker.bootstrap, topics.events, events)
            produce(broker.bootstrap, topics.events, [(b"bad", b"not json")])
            batch += 1
            stop.wait(1.0)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        worker.wait_for(lambda m: m.get("recstream_model_version", 0) >= 2
                        and m.get("recstream_checkpoints_total", 0) >= 1, 240, "training and a checkpoint")
        time.sleep(25)  # enough scrapes for rate() / deriv() windows
        failures = []
        for title, expr in dashboard_panel_expressions(DASHBOARD):
            if any(prefix in expr for prefix in EXTERNAL):
                continue
            answer = _query(prom_port, expr)
            if answer.get("status") != "success" or not answer["data"]["result"]:
                failures.append(f"dashboard panel {title!r}: {expr} -> {answer.get('data', answer)}")
        for expr in alert_expressions(ALERTS):
            answer = _query(prom_port, expr)
            if answer.get("status") != "success":
                failures.append(f"alert expression does not evaluate: {expr} -> {answer}")
            # Conditions are usually false (empty); every series they read must exist.
            for selector in _selectors(expr):
                if not _query(prom_port, selector)["data"]["result"]:
                    failures.append(f"alert reads {selector}, which has no data")
        # Events were ranked before they were applied, under both scorers.
        if not _query(prom_port, "recstream_online_scored_events_total > 0")["data"]["result"]:
            failures.append("no event was scored online (recstream_online_scored_events_total)")
        assert not failures, "\n".join(failures)
    finally:
        stop.set()
        feeder.join(timeout=10)
        prom.terminate()
        prom.wait(timeout=10)
        code = worker.terminate()
    assert code == 0, worker.tail()


def test_promtool_accepts_the_rules(prometheus):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
