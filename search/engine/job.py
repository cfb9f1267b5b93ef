"""One training job run against the storage: the procedure that the baseline and every trial share.

A job is one attempt of an Optuna trial (a trial of the study, or the baseline's trial in its companion
study). While it runs it records heartbeats; it starts from its own newest checkpoint when it is a retry;
after every epoch it checkpoints into the artifact store and writes its records and the checkpoint's id
into the trial's user attrs (:mod:`search.storage.layout`); when it is stopped or interrupted it is failed and
queued again, so that the next worker resumes it from that checkpoint (docs/design.md, "Fault tolerance").

    with TrainingJob(storage, store, trial, "trial 3") as job:
        trainer = job.resume(cfg) or HybridKoopmanTrainer(cfg)
        trainer.fit(callback=lambda record: job.save_epoch(trainer, record) ...)
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from koopman_search.search.engine.study import enqueue_retry
from koopman_search.search.storage import layout
from koopman_search.search.storage.database import Heartbeat
from koopman_search.search.storage.optuna_private import trial_id_of
from koopman_search.search.storage.retry import storage_task
from koopman_search.trainer.errors import CheckpointError
from koopman_search.trainer.records import EpochRecord

if TYPE_CHECKING:
    from koopman_search.trainer.config import TrainerConfig
    from koopman_search.trainer.loop import HybridKoopmanTrainer

__all__ = ["CheckpointCorrupt", "TrainingJob", "env_retry_pause", "file_digest", "is_environment_fault"]

logger = logging.getLogger(__name__)


class CheckpointCorrupt(OSError):
    """A checkpoint in the artifact store is missing, or its size or digest is not the one recorded when it
    was written. An environment fault (an ``OSError``): the trial falls back to an earlier start."""


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file, as a checkpoint pointer records it."""
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def _stored_digest(store: Any, artifact_id: str) -> dict[str, Any]:
    sha, size = hashlib.sha256(), 0
    with store.open_reader(artifact_id) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
            size += len(block)
    return {"size": size, "sha256": sha.hexdigest()}


ENV_RETRY_PAUSE_MAX = 60.0  # seconds


def env_retry_pause(failures: int) -> float:
    """How long a job failed by its environment ``failures`` times waits before its retry may start: 2 s,
    doubling, at most :data:`ENV_RETRY_PAUSE_MAX` (a full disk or an artifact store out of reach is given
    time to pass, instead of the retries failing at once; docs/design.md, "Fault model")."""
    return float(min(2.0**failures, ENV_RETRY_PAUSE_MAX))


def is_environment_fault(exc: BaseException) -> bool:
    """True for a failure of where the trial runs, not of what it computes: an OS error (a full disk, a
    missing or corrupt checkpoint file), the storage or the artifact store out of reach, or torch failing to
    write a checkpoint file."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    from koopman_search.search.errors import StorageError
    from koopman_search.search.storage.retry import TRANSIENT

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (OSError, StorageError, ArtifactNotFound, *TRANSIENT)):
            return True
        if isinstance(seen, RuntimeError) and any(
            mark in str(seen) for mark in ("inline_container", "PytorchStreamWriter", "file write failed")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class TrainingJob:
    """One attempt of a trial, with its heartbeat and a scratch directory for checkpoints in transit.

    Use it as a context manager: the heartbeat runs and the scratch directory lives while it is open."""

    def __init__(self, storage: RDBStorage, artifact_store: Any, trial: optuna.Trial, what: str) -> None:
        self._storage = storage
        self._store = artifact_store
        self._trial = trial
        self._what = what
        self._heartbeat = Heartbeat(storage, trial_id_of(trial))
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        with storage_task(f"read {what}"):
            self.frozen: FrozenTrial = storage.get_trial(trial_id_of(trial))
        self.fallback: str | None = None  # why the attempt did not start from its newest checkpoint
        self.digests: dict[str, dict[str, Any]] = {}  # checkpoints written by this attempt
        newest = layout.trial_attrs(self.frozen).get(layout.CHECKPOINT)
        self._newest: dict[str, Any] | None = dict(newest) if newest else None

    def __enter__(self) -> TrainingJob:
        self._scratch = tempfile.TemporaryDirectory(prefix="koopman-")
        self._heartbeat.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._heartbeat.__exit__(*exc)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    @property
    def scratch(self) -> Path:
        """The job's scratch directory (removed when the job ends)."""
        return self._tmp

    @property
    def _tmp(self) -> Path:
        if self._scratch is None:
            raise RuntimeError(f"{self._what}: the job is used outside its `with` block")
        return Path(self._scratch.name)

    # -- starting --------------------------------------------------------------------------------------------
    def download(self, artifact_id: str, name: str, digest: Mapping[str, Any] | None = None) -> Path:
        """A checkpoint from the artifact store, into the scratch directory; checked against ``digest``
        (its recorded size and sha256) when given. Raises :class:`CheckpointCorrupt`."""
        path = self._tmp / name
        try:
            optuna.artifacts.download_artifact(artifact_store=self._store, file_path=str(path), artifact_id=artifact_id)
        except ArtifactNotFound:
            raise CheckpointCorrupt(f"checkpoint {artifact_id} is missing from the artifact store") from None
        if digest and {"size", "sha256"} <= digest.keys():
            found = file_digest(path)
            if found["size"] != digest["size"] or found["sha256"] != digest["sha256"]:
                path.unlink()
                raise CheckpointCorrupt(
                    f"checkpoint {artifact_id} is corrupt: {found['size']} bytes, sha256 {found['sha256'][:12]}, "
                    f"but {digest['size']} bytes, sha256 {str(digest['sha256'])[:12]} were written"
                )
        return path

    def resume(self, cfg: TrainerConfig) -> HybridKoopmanTrainer | None:
        """The trainer restored from this trial's own newest checkpoint (a retry), else from the one before
        it; None for a first attempt, or when neither can be used (:attr:`fallback` then says why)."""
        from koopman_search.trainer.loop import HybridKoopmanTrainer

        own = layout.trial_attrs(self.frozen).get(layout.CHECKPOINT)
        if not own:
            return None
        problems: list[str] = []
        for pointer in (own, own.get("previous")):
            if not pointer:
                continue
            try:
                path = self.download(pointer["artifact_id"], "resume.pt", pointer)
                trainer = HybridKoopmanTrainer.from_checkpoint(path, cfg)
            except (CheckpointCorrupt, CheckpointError) as exc:
                problems.append(f"epoch {pointer['epoch']}: {exc}")
                logger.warning(
                    "%s: cannot resume from its checkpoint of epoch %d: %s", self._what, pointer["epoch"], exc
                )
                continue
            if problems:
                self.fallback = f"resumed from epoch {pointer['epoch']}; " + "; ".join(problems)
            self._newest = dict(pointer)
            return trainer
        self.fallback = "no checkpoint of its own could be used (" + "; ".join(problems) + ")"
        self._newest = None
        return None

    # -- after every epoch -----------------------------------------------------------------------------------
    def save_epoch(
        self, trainer: HybridKoopmanTrainer, record: EpochRecord, first_epoch: int | None = None
    ) -> tuple[str, str | None]:
        """Checkpoint the trainer into the artifact store, read it back to check it, and record the epoch in
        the trial's user attrs (:func:`search.storage.layout.epoch_attrs`; with ``first_epoch``, what the attempt
        spent too). The pointer keeps the checkpoint before it, for a retry to fall back to. Returns the new
        checkpoint's artifact id and the id of the one that no pointer names any more (the caller may drop
        it), or None."""
        path = trainer.save_checkpoint(self._tmp / f"epoch_{record.epoch}.pt")
        digest = file_digest(path)
        with storage_task(f"upload a checkpoint of {self._what}"):
            artifact_id = optuna.artifacts.upload_artifact(
                artifact_store=self._store, file_path=str(path), study_or_trial=self._trial
            )
        path.unlink()
        stored = _stored_digest(self._store, artifact_id)
        if stored != digest:
            raise CheckpointCorrupt(
                f"checkpoint of epoch {record.epoch} of {self._what} was stored as "
                f"{stored['size']} of {digest['size']} bytes or with another digest"
            )
        attrs = layout.epoch_attrs(trainer.records, record.epoch, artifact_id, first_epoch)
        previous = self._newest
        attrs[layout.CHECKPOINT] = layout.checkpoint_pointer(record.epoch, artifact_id, digest, previous)
        self._write_attrs(attrs)
        dropped = previous.get("previous", {}).get("artifact_id") if previous else None
        self._newest = attrs[layout.CHECKPOINT]
        self.digests[artifact_id] = digest
        return artifact_id, dropped

    def _write_attrs(self, values: dict[str, Any]) -> None:
        with storage_task(f"record an epoch of {self._what}"):
            for key, value in values.items():
                layout.set_trial_attr(self._trial, key, value)

    def remove(self, artifact_id: str) -> None:
        """Drop a checkpoint that nothing refers to any more (one already gone is no error)."""
        try:
            self._store.remove(artifact_id)
        except (ArtifactNotFound, OSError) as exc:
            logger.debug("checkpoint %s not removed: %s", artifact_id, exc)

    # -- ending ----------------------------------------------------------------------------------------------
    def count_environment_failure(self) -> int:
        """One more failure of this job's environment, counted in its attrs (a retry inherits the count);
        returns the count. A count that cannot be stored (the environment still down) is logged, not raised."""
        failures = int(self.frozen.user_attrs.get(layout.ENV_FAILURES, 0)) + 1
        try:
            with storage_task(f"count an environment failure of {self._what}"):
                self._trial.set_user_attr(layout.ENV_FAILURES, failures)
        except Exception:
            logger.warning("%s: its environment failure could not be counted", self._what)
        return failures

    def fail(self, study: optuna.Study, reason: str) -> None:
        """FAIL the attempt with ``reason`` (a no-op if it was already failed elsewhere)."""

        with storage_task(f"fail {self._what}"):
            self._trial.set_user_attr(layout.FAIL_REASON, reason)
            study.tell(self._trial, state=TrialState.FAIL, skip_if_finished=True)

    def hand_back(self, study: optuna.Study, pause: float = 0.0) -> None:
        """Queue the (finished) attempt again: the next worker resumes from its newest checkpoint, not before
        ``pause`` seconds."""
        with storage_task(f"read {self._what}"):
            frozen = self._storage.get_trial(trial_id_of(self._trial))
        enqueue_retry(study, frozen, pause)
