"""The exception tree shared by the trainer and the search service.

Library code raises these; only command-line entry points turn them into messages and exit codes
(``ConfigError`` and its subclasses exit 2, everything else 1).
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "KoopmanError"]


class KoopmanError(Exception):
    """Root of every error koopman-search raises on purpose."""


class ConfigError(KoopmanError, ValueError):
    """A configuration value (file, flag or mapping) is invalid. The message names the key and value."""


class DataError(KoopmanError):
    """A corpus source cannot be read or is unusable (missing split, empty split, no network)."""


class CheckpointError(KoopmanError):
    """A checkpoint cannot be loaded or does not belong to this configuration."""
