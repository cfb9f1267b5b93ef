"""The exception tree shared by the trainer and the search service.

Library code raises these; only command-line entry points turn them into messages and exit codes
(``ConfigError`` and its subclasses exit 2, everything else 1).
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "DataUnavailable", "KoopmanError"]


class KoopmanError(Exception):
    """Root of every error koopman-search raises on purpose."""


class ConfigError(KoopmanError, ValueError):
    """A configuration value (file, flag or mapping) is invalid. The message names the key and value."""


class DataError(KoopmanError):
    """A corpus source is wrong or unusable (a missing directory or split, an unreadable or empty file, an
    unknown dataset): bad input, exit code 2 on the command line."""


class DataUnavailable(KoopmanError):
    """A corpus source cannot be had right now (the Hugging Face hub out of reach): a runtime error."""


class CheckpointError(KoopmanError):
    """A checkpoint cannot be loaded or does not belong to this configuration."""
