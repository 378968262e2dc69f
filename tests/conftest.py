"""Shared fixtures: the embedded broker and unique topic names."""

from __future__ import annotations

import itertools
import os
import uuid

import pytest

_topic_counter = itertools.count()


def unique_topic_name(prefix: str = "t") -> str:
    """A topic name no other test (or parallel run) uses."""
    return f"{prefix}-{os.getpid()}-{next(_topic_counter)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def unique_topic():
    """Factory fixture: ``unique_topic("events")`` -> a fresh topic name."""
    return unique_topic_name


@pytest.fixture(scope="session")
def broker():
    """One embedded tansu broker for the whole test session."""
    from stream.kafka.broker import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running
