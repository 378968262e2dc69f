"""Kafka's own error, under recstream's one root exception type."""

from learners.errors import RecstreamError


class BrokerError(RecstreamError):
    """Kafka could not be reached or answered with an error."""
