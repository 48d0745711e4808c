"""The project's user-facing error type: a leaf module (no imports), so every layer can raise it."""


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming keys, values and what is valid."""
