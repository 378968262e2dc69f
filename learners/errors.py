"""One root exception type; every subclass tells the user what to do."""


class RecstreamError(Exception):
    """Root of every error recstream raises on purpose."""


class ConfigError(RecstreamError):
    """A setting is wrong; the message names the flag / variable to fix."""


class ModelLoadError(RecstreamError):
    """The text model could not be loaded from the given local folder."""


class CheckpointError(RecstreamError):
    """A checkpoint is missing, torn or does not match the model."""
