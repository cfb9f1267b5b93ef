"""Opening an existing storage for review.

Reviewing never creates anything: a SQLite URL must name an existing file, because opening a missing one
would create an empty database there (and the user would then look at "no studies" instead of a typo).
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy.exc
from optuna.storages import RDBStorage
from sqlalchemy.engine import make_url

from koopman_search.search.storage.database import open_storage
from koopman_search.search.studyfile.urls import redact_url
from koopman_search.trainer.errors import ConfigError

__all__ = ["open_existing_storage"]

logger = logging.getLogger(__name__)


def open_existing_storage(url: str, read_only: bool = False) -> RDBStorage:
    """The storage at ``url`` (no heartbeat: review only reads and annotates; ``read_only`` for the commands
    that write nothing: a SQLite file opened read-only, its journal mode left alone). Raises ConfigError for a
    missing or malformed URL or a SQLite file that does not exist (bad input, exit 2)."""
    if not url:
        raise ConfigError(
            "a storage is required: give a study file or --storage URL, or set OPTUNA_STORAGE, but got storage=''"
        )
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise ConfigError(
            f"storage must be a database URL like sqlite:///study.db, but got storage={redact_url(url)!r}"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if not database or database == ":memory:" or not Path(database).is_file():
            raise ConfigError(  # bad input (exit 2): a path that names no database
                f"storage file must exist, but got storage={redact_url(url)!r} (no file {database!r}); "
                "check the path, or create the study first"
            )
    return open_storage(url, heartbeat=False, read_only=read_only)
