"""One training job run against the storage: the procedure that the baseline and every trial share.

A job is one attempt of an Optuna trial (a trial of the study, or the baseline's trial in its companion
study). While it runs it records heartbeats; it starts from its own newest checkpoint when it is a retry;
after every epoch it checkpoints into the artifact store and writes its records and the checkpoint's id
into the trial's user attrs (:mod:`search.layout`); when it is stopped or interrupted it is failed and
queued again, so that the next worker resumes it from that checkpoint (docs/design.md, "Fault tolerance").

    with TrainingJob(storage, store, trial, "trial 3") as job:
        trainer = job.resume(cfg) or HybridKoopmanTrainer(cfg)
        trainer.fit(callback=lambda record: job.save_epoch(trainer, record) ...)
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from search import layout
from search.storage import Heartbeat, retrying
from search.study import enqueue_retry
from trainer.records import EpochRecord

if TYPE_CHECKING:
    from trainer.config import TrainerConfig
    from trainer.loop import HybridKoopmanTrainer

__all__ = ["TrainingJob"]

logger = logging.getLogger(__name__)


class TrainingJob:
    """One attempt of a trial, with its heartbeat and a scratch directory for checkpoints in transit.

    Use it as a context manager: the heartbeat runs and the scratch directory lives while it is open."""

    def __init__(self, storage: RDBStorage, artifact_store: Any, trial: optuna.Trial, what: str) -> None:
        self._storage = storage
        self._store = artifact_store
        self._trial = trial
        self._what = what
        self._heartbeat = Heartbeat(storage, trial._trial_id)
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.frozen: FrozenTrial = retrying(lambda: storage.get_trial(trial._trial_id), f"read {what}")

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
    def _tmp(self) -> Path:
        if self._scratch is None:
            raise RuntimeError(f"{self._what}: the job is used outside its `with` block")
        return Path(self._scratch.name)

    # -- starting --------------------------------------------------------------------------------------------
    def download(self, artifact_id: str, name: str) -> Path:
        """A checkpoint from the artifact store, into the scratch directory."""
        path = self._tmp / name
        retrying(lambda: optuna.artifacts.download_artifact(
            artifact_store=self._store, file_path=str(path), artifact_id=artifact_id), "download a checkpoint")
        return path

    def resume(self, cfg: TrainerConfig) -> HybridKoopmanTrainer | None:
        """The trainer restored from this trial's own newest checkpoint (a retry), or None (a first attempt)."""
        from trainer.loop import HybridKoopmanTrainer

        own = self.frozen.user_attrs.get(layout.CHECKPOINT)
        if not own:
            return None
        return HybridKoopmanTrainer.from_checkpoint(self.download(own["artifact_id"], "resume.pt"), cfg)

    # -- after every epoch -----------------------------------------------------------------------------------
    def save_epoch(self, trainer: HybridKoopmanTrainer, record: EpochRecord, first_epoch: int | None = None) -> str:
        """Checkpoint the trainer into the artifact store and record the epoch in the trial's user attrs
        (:func:`search.layout.epoch_attrs`; with ``first_epoch``, what the attempt spent too). Returns the
        checkpoint's artifact id."""
        path = trainer.save_checkpoint(self._tmp / f"epoch_{record.epoch}.pt")
        artifact_id = retrying(lambda: optuna.artifacts.upload_artifact(
            artifact_store=self._store, file_path=str(path), study_or_trial=self._trial),
            f"upload a checkpoint of {self._what}")
        path.unlink()
        self._write_attrs(layout.epoch_attrs(trainer.records, record.epoch, artifact_id, first_epoch))
        return artifact_id

    def _write_attrs(self, values: dict[str, Any]) -> None:
        def write() -> None:
            for key, value in values.items():
                self._trial.set_user_attr(key, value)

        retrying(write, f"record an epoch of {self._what}")

    def remove(self, artifact_id: str) -> None:
        """Drop a checkpoint that nothing refers to any more."""
        self._store.remove(artifact_id)

    # -- ending ----------------------------------------------------------------------------------------------
    def fail(self, study: optuna.Study, reason: str) -> None:
        """FAIL the attempt with ``reason`` (a no-op if it was already failed elsewhere)."""

        def tell() -> None:
            self._trial.set_user_attr(layout.FAIL_REASON, reason)
            study.tell(self._trial, state=TrialState.FAIL, skip_if_finished=True)

        retrying(tell, f"fail {self._what}")

    def hand_back(self, study: optuna.Study) -> None:
        """Queue the (finished) attempt again: the next worker resumes from its newest checkpoint."""
        enqueue_retry(study, retrying(lambda: self._storage.get_trial(self._trial._trial_id),
                                      f"read {self._what}"))
