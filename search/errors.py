"""The search service's errors: a few leaves under the roots in :mod:`trainer.errors`.

    KoopmanError
    ├── ConfigError (ValueError)        exit 2
    │   └── SpecError                   a study file is invalid
    ├── StorageError                    the study's database cannot be used
    ├── BaselineError                   the baseline run failed or its curve does not fit the study
    └── StudyNotFoundError              no study of that name in the storage

Library code raises these; only the command line turns them into messages and exit codes.
"""

from __future__ import annotations

from koopman_search.trainer.errors import ConfigError, KoopmanError

__all__ = ["BaselineError", "SpecError", "StorageError", "StudyNotFoundError"]


class SpecError(ConfigError):
    """A study file is invalid. One line: what must hold, the value, the file and the key."""

    @classmethod
    def at(cls, problem: str, origin: str, key: str = "") -> SpecError:
        """``problem (origin, [key])``: the one shape every study-file message has."""
        where = ", ".join(part for part in (origin, f"[{key}]" if key else "") if part)
        return cls(f"{problem} ({where})" if where else problem)


class StorageError(KoopmanError):
    """The study's storage cannot be reached, created or read."""


class BaselineError(KoopmanError):
    """The baseline run failed, or its per-epoch curve does not cover the epochs asked for."""


class StudyNotFoundError(KoopmanError):
    """No study of the given name exists in the storage."""
