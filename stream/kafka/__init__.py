"""Kafka I/O: the embedded broker, consumers and sinks, the items follower, message formats,
where a stream came from, and what a restart needs to read back from the topics."""
