"""Errors a user can act on. The CLI prints them in one line, without a traceback, and exits 2."""


class StepError(RuntimeError):
    """A pipeline step failed for a reason the user can act on; the message names the file or key."""


class ConfigError(ValueError):
    """A parameter or catalog entry is missing, unknown or invalid; the message names the file and key."""
