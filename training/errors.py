"""Errors of the training package that know no transport (the training service maps them to INVALID_ARGUMENT)."""


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names the field and the fix."""
