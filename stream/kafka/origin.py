"""Which stream a checkpoint belongs to: the Kafka cluster, the consumer group and the topics.

A checkpoint's offsets mean something only on the log they were read from.
Applied to another cluster's topics of the same name they would skip real
events wherever that log is longer, so a worker given the checkpoint of
another stream refuses to start and says what to do instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from kafka import KafkaAdminClient

from learners.errors import RecstreamError


class ForeignCheckpointError(RecstreamError):
    """The state folder holds the checkpoint of another stream."""


@dataclass(frozen=True)
class StreamOrigin:
    cluster_id: Optional[str]  # None: the broker does not report one (Metadata before v2)
    group_id: str
    events_topic: str
    items_topic: str

    @classmethod
    def of(cls, settings, cluster_id: Optional[str]) -> "StreamOrigin":
        return cls(cluster_id, settings.group_id, settings.events_topic, settings.items_topic)

    @classmethod
    def from_dict(cls, data: dict) -> "StreamOrigin":
        return cls(data.get("cluster_id"), str(data["group_id"]), str(data["events_topic"]),
                   str(data["items_topic"]))

    def as_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: "StreamOrigin") -> list[str]:
        """'field: ours vs theirs' for each field that differs (an unknown cluster id matches any)."""
        out = []
        for name, mine in self.as_dict().items():
            theirs = getattr(other, name)
            if name == "cluster_id" and (mine is None or theirs is None):
                continue
            if mine != theirs:
                out.append(f"{name} {theirs!r} (this worker: {mine!r})")
        return out


def check_checkpoint_origin(current: StreamOrigin, saved: Optional[dict], state_dir) -> None:
    """Raise ``ForeignCheckpointError`` when the checkpoint in ``state_dir`` came from another stream.
    A checkpoint that records no origin is taken as this stream's."""
    if not saved:
        return
    differences = current.differences(StreamOrigin.from_dict(saved))
    if differences:
        raise ForeignCheckpointError(
            f"the checkpoint in --state-dir {state_dir} belongs to another stream: "
            + "; ".join(differences)
            + ". Resuming from it would apply its offsets to these topics and skip real events. Give this "
            "worker a --state-dir (RECSTREAM_STATE_DIR) of its own, or, if that checkpoint is no longer "
            f"needed, move {state_dir} away and start again to begin fresh.")


def fetch_cluster_id(settings, timeout_ms: int) -> Optional[str]:
    """The cluster id the brokers report (one admin request)."""
    consumer = settings.reader_kwargs("admin")
    admin = KafkaAdminClient(bootstrap_servers=consumer["bootstrap_servers"], client_id=consumer["client_id"],
                             request_timeout_ms=timeout_ms,
                             **{k: v for k, v in consumer.items() if k.startswith(("security_", "sasl_", "ssl_"))})
    try:
        return admin.describe_cluster().get("cluster_id")
    finally:
        admin.close()
