"""One root exception type; every subclass tells the user what to do."""


class RecstreamError(Exception):
    """Root of every error recstream raises on purpose."""


class ConfigError(RecstreamError):
    """A setting is wrong; the message names the flag / variable to fix."""


class ModelLoadError(RecstreamError):
    """The text model could not be loaded from the given local folder."""


class CheckpointError(RecstreamError):
    """A checkpoint is missing, torn or does not match the model."""


class FatalError(RecstreamError):
    """What the worker stands on fails (its state dir, say), not a record: no record is set aside
    for it; the worker stops with the message, and resumes from its last checkpoint once fixed."""
