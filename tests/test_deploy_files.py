"""The files under deploy/ parse, agree with Settings and the metric table, and pass promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from promql import alert_rules, alert_expressions, dashboard_expressions, dashboard_panel_expressions
from stream.config import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "recstream.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
K8S_DIRS = [DEPLOY / "k8s", DEPLOY / "k8s-gpu"]

REQUIRED_PANELS = [
    "Ingest rate", "Consumer lag", "Dead-lettered events by reason", "Training loss and EWC penalty",
    "Replay buffer fill", "Model version", "Vectors published by kind", "Event-to-vector freshness",
    "Item refresh p99", "Checkpoint age", "Process resident memory", "Fetch paused",
    "Online quality (test, then train)", "Model updates undone",
]
REQUIRED_ALERTS = [
    "RecstreamWorkerDown", "RecstreamConsumerLagGrowing", "RecstreamCommittedLagHigh", "RecstreamDeadLetterSpike",
    "RecstreamFreshnessP99OverBudget", "RecstreamNoModelUpdate", "RecstreamCheckpointTooOld",
    "RecstreamModelBelowPopularity",
]
METRIC = re.compile(r"recstream_[a-z][a-z0-9_]*")
SETTING_VAR = re.compile(r"RECSTREAM_[A-Z0-9_]*[A-Z0-9]")


def text_files(folder: Path):
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                yield path, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def yaml_documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def documented_metrics() -> set[str]:
    """First column of the metric table in ARCHITECTURE.md."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Metric names", 1)[1]
    names = set()
    for line in section.splitlines():
        match = re.match(r"\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|", line)
        if match:
            names.add(match.group(1))
    assert len(names) > 20, "metric table of ARCHITECTURE.md not found"
    return names


def metric_names(expressions) -> set[str]:
    names = set()
    for expr in expressions:
        for name in METRIC.findall(expr):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def k8s_manifests() -> list[Path]:
    return sorted(p for d in K8S_DIRS for p in d.rglob("*.yaml"))


# --------------------------------------------------------------- compose
def test_compose_parses_and_has_the_stack():
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"kafka", "topics", "worker", "kafka-exporter", "prometheus", "grafana"} <= set(services)
    assert services["kafka"]["image"] == "apache/kafka:3.9.0"
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    worker = services["worker"]
    assert worker["build"]["context"] == ".." and worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert worker["environment"]["RECSTREAM_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    script = services["topics"]["command"][0]
    for topic in ("events", "items", "vectors", "events.dlq", "events.changelog"):
        assert f"--topic {topic} " in script
    assert "--topic events     --partitions 6" in script
    assert "--topic events.changelog --partitions 6 --config cleanup.policy=compact" in script
    assert script.count("cleanup.policy=compact") == 3
    assert services["kafka-exporter"]["image"].startswith("danielqsj/kafka-exporter")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_compose_bind_mounts_exist():
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    mounts = [v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])
              if isinstance(v, str) and v.startswith(".")]
    assert mounts
    for source in mounts:
        assert (DEPLOY / source).exists(), source


# --------------------------------------------------------------- Dockerfile
def test_dockerfile_essentials():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, re.M)
    assert "https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1" in text
    assert "pip install ." in text
    for line in ("STOPSIGNAL SIGTERM", 'ENTRYPOINT ["tini", "--", "recstream"]', 'CMD ["worker"]',
                 "EXPOSE 9108", "USER 10001:10001", 'VOLUME ["/var/lib/recstream"]'):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert "HF_HUB_OFFLINE=1" in text and "TRANSFORMERS_OFFLINE=1" in text
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M)


def test_dockerfile_copy_sources_exist():
    text = DOCKERFILE.read_text(encoding="utf-8")
    for match in re.finditer(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in match.group(1).split():
            assert (ROOT / source).exists(), f"COPY source {source} is missing from the repository"


# --------------------------------------------------------------- Kubernetes
def test_k8s_manifests_parse():
    paths = k8s_manifests()
    assert paths
    kinds = {}
    for path in paths:
        for doc in yaml_documents(path):
            assert "apiVersion" in doc and "kind" in doc, path
            kinds.setdefault(doc["kind"], []).append(doc)
    for kustomization in kinds["Kustomization"]:
        assert kustomization["resources"]
    base = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text(encoding="utf-8"))
    for resource in base["resources"]:
        assert (DEPLOY / "k8s" / resource).is_file(), resource
    assert {"ConfigMap", "StatefulSet", "Service", "PodMonitor"} <= set(kinds)
    assert kinds["PodMonitor"][0]["apiVersion"] == "monitoring.coreos.com/v1"


def test_statefulset_probes_and_state():
    (sts,) = [d for d in yaml_documents(DEPLOY / "k8s" / "statefulset.yaml") if d["kind"] == "StatefulSet"]
    spec = sts["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 9108} in container["ports"]
    assert container["envFrom"][0]["configMapRef"]["name"] == "recstream-config"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["cpu"]
    assert {"name": "state", "mountPath": "/var/lib/recstream"} in container["volumeMounts"]
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    config = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text(encoding="utf-8"))
    assert config["data"]["RECSTREAM_STATE_DIR"] == "/var/lib/recstream"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
@pytest.mark.parametrize("folder", K8S_DIRS, ids=lambda p: p.name)
def test_kustomize_builds(folder):
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    if folder.name == "k8s-gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "RECSTREAM_DEVICE", "value": "cuda"} in container["env"]
        assert container["image"].endswith(":cuda")
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert container["image"].endswith(":cpu")


def test_distributed_deploy_files_run_torchrun_with_distributed():
    override = yaml.safe_load((DEPLOY / "docker-compose.distributed.yml").read_text(encoding="utf-8"))
    worker = override["services"]["worker"]
    assert worker["entrypoint"][-1] == "torchrun" and "--nproc-per-node=2" in worker["command"]
    assert worker["environment"]["RECSTREAM_DISTRIBUTED"] == "true"
    docs = {d["kind"]: d for d in yaml_documents(DEPLOY / "k8s" / "distributed.yaml")}
    assert docs["Service"]["spec"]["clusterIP"] == "None"  # headless: pod 0's stable name
    pod = docs["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"][0]
    assert "torchrun" in args and "--rdzv-endpoint=recstream-dist-0.recstream-dist:" in args
    assert "--rdzv-backend=c10d" in args and re.search(r"--nnodes=1:\d+", args)  # elastic: pods come and go
    assert {"name": "RECSTREAM_DISTRIBUTED", "value": "true"} in container["env"]
    # Without it torch's agents never re-form a grown group (docs/operating.md).
    assert {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"} in container["env"]
    assert docs["StatefulSet"]["spec"]["serviceName"] == docs["Service"]["metadata"]["name"]


# --------------------------------------------------------------- settings
def test_every_recstream_variable_is_a_setting():
    fields = set(Settings.model_fields)
    seen = {}
    for path, text in text_files(DEPLOY):
        for var in SETTING_VAR.findall(text):
            seen.setdefault(var, path.relative_to(ROOT))
    assert "RECSTREAM_BOOTSTRAP_SERVERS" in seen
    unknown = {var: str(path) for var, path in seen.items() if var[len("RECSTREAM_"):].lower() not in fields}
    assert not unknown, f"not Settings fields: {unknown}"


# --------------------------------------------------------------- dashboard
def test_dashboard_has_the_panels():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "recstream" and 36 <= dashboard["schemaVersion"] <= 41
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles))
    missing = [t for t in REQUIRED_PANELS if t not in titles]
    assert not missing, missing
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["type"] in {"timeseries", "stat"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        assert panel["targets"] and all(t["expr"] and t["datasource"]["uid"] == "prometheus"
                                        for t in panel["targets"])
    by_title = dict(dashboard_panel_expressions(DASHBOARD))
    assert "histogram_quantile(0.99" in by_title["Event-to-vector freshness"]
    quality = " ".join(e for t, e in dashboard_panel_expressions(DASHBOARD) if t == "Online quality (test, then train)")
    assert "recstream_online_ndcg_at_10" in quality and "recstream_online_recall_at_10" in quality
    assert "by (scorer)" in quality  # the model and popularity, side by side
    assert "$" not in "".join(dashboard_expressions(DASHBOARD)), "unsubstituted Grafana variable"


def test_grafana_provisioning_points_at_the_dashboard():
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (prom,) = datasource["datasources"]
    assert prom["uid"] == "prometheus" and prom["type"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/recstream.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert f"./grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]


# --------------------------------------------------------------- alerts and metric names
def test_alert_rules_are_complete():
    rules = {rule["alert"]: rule for rule in alert_rules(ALERTS)}
    missing = [a for a in REQUIRED_ALERTS if a not in rules]
    assert not missing, missing
    for name, rule in rules.items():
        assert "for" in rule, name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key), (name, key)
    assert "kafka_consumergroup_lag" in rules["RecstreamCommittedLagHigh"]["expr"]
    assert "recstream_consumer_lag_records" in rules["RecstreamConsumerLagGrowing"]["expr"]
    below = rules["RecstreamModelBelowPopularity"]
    assert 'scorer="model"' in below["expr"] and 'scorer="popularity"' in below["expr"] and below["for"] == "15m"


def test_metric_names_are_in_the_architecture_table():
    known = documented_metrics()
    used = metric_names(dashboard_expressions(DASHBOARD) + alert_expressions(ALERTS))
    assert "recstream_event_to_vector_seconds" in used
    unknown = sorted(used - known)
    assert not unknown, f"metrics missing from the ARCHITECTURE.md table: {unknown}"


def test_promql_helpers_substitute_grafana_variables():
    exprs = dashboard_expressions(DASHBOARD)
    assert any("[1m]" in e for e in exprs)
    assert len(alert_expressions(ALERTS)) == len(alert_rules(ALERTS))


def test_prometheus_config_scrapes_worker_and_exporter():
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["recstream"] == ["worker:9108"]
    assert targets["kafka-exporter"] == ["kafka-exporter:9308"]
    assert config["rule_files"] == ["alerts.yml"]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not on PATH (apt-get install prometheus, or a Prometheus release tarball)")
@pytest.mark.parametrize("args", [["check", "rules", str(ALERTS)], ["check", "config", str(PROMETHEUS)]],
                         ids=["rules", "config"])
def test_promtool(args):
    result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------- connectors
@pytest.mark.parametrize("name, connector_class, endpoint_key", [
    ("qdrant-sink.json", "io.qdrant.kafka.QdrantSinkConnector", "qdrant.grpc.url"),
    ("milvus-sink.json", "com.milvus.io.kafka.MilvusSinkConnector", "public.endpoint"),
])
def test_connector_configs(name, connector_class, endpoint_key):
    connector = json.loads((DEPLOY / "connectors" / name).read_text(encoding="utf-8"))
    config = connector["config"]
    assert connector["name"] and config["connector.class"] == connector_class
    assert config["topics"] == "vectors" and config[endpoint_key]
    assert config["value.converter"] == "org.apache.kafka.connect.json.JsonConverter"
    assert config["value.converter.schemas.enable"] == "false"
    assert all(isinstance(v, str) for v in config.values()), "Kafka Connect wants string values"
