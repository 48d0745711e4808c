"""The project's user-facing error types: a leaf module (no imports), so every layer can raise
them and train.py can catch them without importing the layer that raises."""


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming keys, values and what is valid."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or trusted: one line naming the file and why."""
