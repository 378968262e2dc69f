"""The worker side: Kafka I/O, the worker loop, metrics and the CLI."""
