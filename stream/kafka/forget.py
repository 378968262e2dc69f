"""Forget requests (docs/formats.md, "Forget request"): the record, its validation, and sending one.

The key is the user id and is what counts (the topic can then be compacted
by user); the JSON value says who asked when, and a value naming another user
is refused rather than guessed at. Like events, a bad request is a
``BadRecord`` with a reason, for the dead-letter topic, never an exception.
"""

from __future__ import annotations

import json
import time
from typing import Optional, Union

from learners.errors import RecstreamError
from learners.records import MAX_ID_CHARS, BadRecord
from stream.kafka.errors import BrokerError

# The reasons a forget request is refused (besides those it shares with events: invalid_utf8,
# empty_id, id_too_long, bad_id_chars); the dead-letter metric pre-creates a series for each.
FORGET_REASONS = ("missing_key", "id_mismatch")


def parse_forget(key: Optional[bytes], value: Optional[bytes]) -> Union[str, BadRecord]:
    """The user id a forget record asks to erase, or why it cannot be applied."""
    raw = value if value is not None else b""
    if key is None or not key:
        return BadRecord("missing_key", raw, "a forget request is keyed by the user id")
    try:
        user_id = key.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord("invalid_utf8", raw, f"key: {exc}")
    if not user_id.strip():
        return BadRecord("empty_id", raw, "key")
    if len(user_id) > MAX_ID_CHARS:
        return BadRecord("id_too_long", raw, f"key longer than {MAX_ID_CHARS}")
    if not user_id.isprintable():
        return BadRecord("bad_id_chars", raw, "key holds a control or other non-printable character")
    try:
        named = json.loads(raw).get("user_id", user_id) if raw else user_id
    except (ValueError, AttributeError):
        named = user_id  # the value is informational: the key says who
    if named != user_id:
        return BadRecord("id_mismatch", raw, "the value's user_id differs from the key")
    return user_id


def encode_forget(user_id: str, requested_at: Optional[float] = None) -> tuple[bytes, bytes]:
    """(key, value) of one forget request."""
    when = time.time() if requested_at is None else requested_at
    return user_id.encode("utf-8"), json.dumps({"user_id": user_id, "requested_at": when}).encode()


class InvalidUserId(RecstreamError):
    """The user id cannot name a user (the worker would dead-letter the request)."""


def send_forget(bootstrap_servers: str, topic: str, user_id: str, timeout_s: float = 30.0) -> tuple[int, int]:
    """Write one forget request and wait for Kafka to take it; returns (partition, offset).

    Raises ``InvalidUserId`` for an id the worker would refuse, and
    ``BrokerError`` when Kafka cannot be reached or does not take it within ``timeout_s``.
    """
    key, value = encode_forget(user_id)
    checked = parse_forget(key, value)
    if isinstance(checked, BadRecord):
        raise InvalidUserId(f"{user_id!r} is not a valid user id ({checked.reason})")
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    timeout_ms = max(1, int(timeout_s * 1000))
    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap_servers.split(","), acks="all",
                                 client_id="recstream-forget", bootstrap_timeout_ms=timeout_ms,
                                 max_block_ms=timeout_ms, request_timeout_ms=timeout_ms)
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap_servers} within {timeout_s:g}s "
                          f"({type(exc).__name__}); check --bootstrap-servers and that the cluster is up") from None
    try:
        metadata = producer.send(topic, key=key, value=value).get(timeout=timeout_s)
    except KafkaError as exc:
        raise BrokerError(f"Kafka at {bootstrap_servers} did not take the forget request for topic {topic!r} "
                          f"within {timeout_s:g}s ({type(exc).__name__}: {exc})") from None
    finally:
        producer.close(timeout=1)
    return metadata.partition, metadata.offset
