"""Opening an existing study for review: a storage URL that must already hold it, and the study by name.

Reviewing never creates anything: a SQLite URL must name an existing file (Optuna would otherwise create
an empty database there), and a missing study is an error that lists the studies that are there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from search.errors import StorageError, StudyNotFoundError
from search.spec import redact_url
from trainer.errors import ConfigError

__all__ = ["open_storage", "open_study"]

logger = logging.getLogger(__name__)


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage at ``url``; raises StorageError when it is not there or not reachable."""
    if not url:
        raise ConfigError(
            "a storage is required: give a study file or --storage URL, or set OPTUNA_STORAGE, "
            "but got storage=''"
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
            raise StorageError(
                f"storage file must exist, but got storage={redact_url(url)!r} (no file {database!r}); "
                "check the path, or run the study first"
            )
    try:
        return optuna.storages.RDBStorage(url)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise StorageError(
            f"storage must be reachable, but got storage={redact_url(url)!r}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    except ImportError as exc:  # a database driver that is not installed
        raise StorageError(
            f"storage needs a driver that is not installed ({exc}), storage={redact_url(url)!r}"
        ) from None


def open_study(storage: optuna.storages.BaseStorage, study_name: str | None, url: str = "") -> optuna.Study:
    """The study named ``study_name``; without a name, the storage's only study.

    Raises StudyNotFoundError naming the study and listing the ones in the storage."""
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    where = f"storage {redact_url(url)!r}" if url else "the storage"
    if study_name is None:
        if len(names) == 1:
            study_name = names[0]
        elif not names:
            raise StudyNotFoundError(f"{where} must hold a study, but it has none; run the study first")
        else:
            raise ConfigError(
                f"--study-name is required when a storage holds several studies, but got studies={names} "
                f"in {where}"
            )
    if study_name not in names:
        found = ", ".join(names) if names else "none"
        raise StudyNotFoundError(
            f"study must exist, but got study_name={study_name!r}: not in {where} (studies there: {found})"
        )
    return optuna.load_study(study_name=study_name, storage=storage)
