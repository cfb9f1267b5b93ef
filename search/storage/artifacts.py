"""The artifact store for checkpoints: a directory shared by the workers (written atomically), or S3.

store = open_artifact_store("runs/artifacts")    # created when missing
check_artifacts("runs/artifacts")                # ConfigError (exit 2) unless writable; before any write
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import optuna

from koopman_search.search.errors import StorageError
from koopman_search.search.storage import optuna_private
from koopman_search.trainer.checkpoint import atomic_write, probe_dir
from koopman_search.trainer.errors import ConfigError

__all__ = ["AtomicFileSystemArtifactStore", "check_artifacts", "open_artifact_store", "store_problem"]

logger = logging.getLogger(__name__)


def open_artifact_store(location: str) -> optuna.artifacts.FileSystemArtifactStore | Any:
    """The artifact store for checkpoints: a directory shared by the workers, or ``s3://bucket/prefix``
    (needs boto3; endpoint from ``AWS_ENDPOINT_URL`` for S3-compatible stores)."""
    if location.startswith("s3://"):
        try:
            import boto3
        except ImportError:
            raise StorageError(f"artifact store {location} needs boto3: pip install 'koopman-search[s3]'") from None
        bucket, _, prefix = location[len("s3://") :].partition("/")
        from optuna.artifacts import Boto3ArtifactStore

        store = Boto3ArtifactStore(bucket, client=boto3.client("s3"))
        if prefix:
            logger.warning(
                "artifact store %s: the prefix %r is ignored by Optuna's Boto3ArtifactStore", location, prefix
            )
        return store
    path = Path(location)
    path.mkdir(parents=True, exist_ok=True)
    return AtomicFileSystemArtifactStore(str(path))


def check_artifacts(location: str) -> None:
    """Raise :class:`ConfigError` (bad input, exit 2) unless ``location`` is a directory this process can
    create and write to (an ``s3://`` store is checked when it is opened). Commands call this before they
    write to the database, so a bad ``artifacts`` leaves nothing behind."""
    if location.startswith("s3://"):
        return
    path = Path(location)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"artifacts must be a directory, but got artifacts={location!r}, which is a file; "
            "give a directory (it is created when missing)"
        )
    try:
        probe_dir(path)
    except OSError as exc:
        raise ConfigError(
            f"artifacts must be a directory this process can write to, but got artifacts={location!r} "
            f"({exc.strerror or exc}); give a writable directory"
        ) from None


PROBE_BYTES = 1 << 20  # what a probe writes: a store that cannot take 1 MiB cannot take a checkpoint either


def store_problem(location: str) -> str | None:
    """Why a directory artifact store cannot take a write right now (full, read-only, gone and not to be
    made again), or None when a probe of :data:`PROBE_BYTES` went in and was removed. An ``s3://`` store is
    not probed (None)."""
    if location.startswith("s3://"):
        return None
    try:
        probe_dir(location, PROBE_BYTES)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class AtomicFileSystemArtifactStore(optuna.artifacts.FileSystemArtifactStore):
    """Optuna's directory store, writing each artifact to a temporary name beside it and renaming it into
    place once it is whole and on disk: a write that fails (a full disk, a killed worker) leaves no partial
    file under the artifact's name, and the temporary one is removed when the failure is an exception."""

    def write(self, artifact_id: str, content_body: Any) -> None:
        # the trainer's atomic write; a directory removed while the study runs is the environment's fault, so
        # it is made again (parents=True) and the study goes on
        target = Path(optuna_private.artifact_path(self, artifact_id))
        atomic_write(target, lambda fh: shutil.copyfileobj(content_body, fh), parents=True)
