"""Running one trial end to end (:class:`TrialRunner`); the loop that feeds it is
:func:`koopman_search.search.workers.run_worker`.

A trial: parameters from the sampler (or the queue) → trainer config → start from scratch, from the
baseline's warmup checkpoint, or from its own last checkpoint when it is a retry → after every epoch store
the records, checkpoint into the artifact store, apply the prune rules → COMPLETE with the objective values,
PRUNED with the reason and the epoch, or FAIL with a reason. A trial's failure never takes its worker down.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from koopman_search.search.engine.job import (
    CheckpointCorrupt,
    TrainingJob,
    env_retry_pause,
    file_digest,
    is_environment_fault,
)
from koopman_search.search.pruning.judge import EpochJudge
from koopman_search.search.settings import runtime
from koopman_search.search.storage import layout
from koopman_search.search.storage.database import exclusive
from koopman_search.search.storage.layout import MatchedBaseline, round_significant
from koopman_search.search.storage.optuna_private import storage_of, study_id_of, trial_id_of
from koopman_search.search.storage.retry import storage_task
from koopman_search.search.studyfile.spec import StudySpec
from koopman_search.search.text import number
from koopman_search.trainer.errors import CheckpointError
from koopman_search.trainer.records import EpochRecord

if TYPE_CHECKING:
    from koopman_search.trainer.config import TrainerConfig
    from koopman_search.trainer.loop import HybridKoopmanTrainer

__all__ = ["TrialOutcome", "TrialRunner", "format_outcome"]

logger = logging.getLogger(__name__)

# Attempts of one trial that its environment may fail (a full disk, the artifact store, the database) before
# the trial is given up as lost; each failed attempt is queued again with its parameters and checkpoint.


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    state: str  # "COMPLETE" | "PRUNED" | "FAIL"
    params: dict[str, Any]
    values: tuple[float, ...] | None
    reason: str | None
    epochs_run: int
    epochs_from_warmup: int
    epochs_resumed: int
    label: str | None = None
    trial_id: int | None = None
    stored: bool = True  # False when the attempt was failed elsewhere meanwhile and its end was dropped
    requeued: bool = False  # interrupted, or failed by its environment, and queued again: not a trial used up
    lost: bool = False  # failed by its environment more than KOOPMAN_ENV_RETRY_MAX times: not queued again
    environment: bool = False  # failed by its environment (a full disk, the artifact store or database away)


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}


def _stored(value: float) -> float:
    rounded = round_significant(value)
    return value if rounded is None else rounded


def format_outcome(o: TrialOutcome, metrics: list[str]) -> str:
    """One progress line per finished trial."""
    params = " ".join(f"{k}={number(v)}" for k, v in o.params.items())
    label = f" [{o.label}]" if o.label else ""
    epochs = f"{o.epochs_run} epochs run"
    if o.epochs_from_warmup:
        epochs += f", {o.epochs_from_warmup} from shared warmup"
    if o.epochs_resumed:
        epochs += f", resumed after epoch {o.epochs_resumed}"
    if o.state == "COMPLETE" and o.values is not None:
        result = "COMPLETE " + " ".join(f"{m}={number(v)}" for m, v in zip(metrics, o.values, strict=True))
    else:
        result = f"{o.state}: {o.reason}"
    return f"trial {o.number}{label} {params} | {epochs} | {result}"


class TrialRunner:
    """Runs claimed trials of one study, each as a :class:`~koopman_search.search.engine.job.TrainingJob`."""

    def __init__(
        self,
        spec: StudySpec,
        study: optuna.Study,
        storage: RDBStorage,
        artifact_store: Any,
        baseline: MatchedBaseline,
        stop: threading.Event | None = None,
        on_epoch: Callable[[int, EpochRecord], None] | None = None,
        on_step: Callable[[int | None, int, int, int, int], None] | None = None,
    ) -> None:
        self._spec = spec
        self._on_step = on_step
        self._study = study
        self._storage = storage
        self._store = artifact_store
        self._baseline = baseline
        self._stop = stop or threading.Event()
        self._on_epoch = on_epoch
        self._judge = EpochJudge.for_study(spec, baseline, storage, study_id_of(study))

    def run(self, trial: optuna.Trial) -> TrialOutcome:
        with TrainingJob(self._storage, self._store, trial, f"trial {trial.number}") as job:
            return self._run(trial, job)

    def _start(self, job: TrainingJob, cfg: TrainerConfig) -> tuple[HybridKoopmanTrainer, int, int]:
        """The trainer to continue: (trainer, epochs_from_warmup, epochs_resumed). A retry resumes from its
        newest checkpoint, else the one before it, else the baseline's warmup checkpoint, else epoch 0; every
        step down is logged and kept in the :data:`~koopman_search.search.storage.layout.RESUME_FALLBACK` attr."""
        from koopman_search.trainer.loop import HybridKoopmanTrainer

        warm = int(job.frozen.user_attrs.get(layout.EPOCHS_FROM_WARMUP, 0))
        resumed = job.resume(cfg)
        if resumed is not None:  # a retry: continue from the last checkpoint of the attempt that died or stopped
            if job.fallback:
                logger.warning("trial %d: %s", job.frozen.number, job.fallback)
            return resumed, warm, resumed.epoch
        s = cfg.koopman.start_epoch
        artifact = self._baseline.checkpoints.get(s) if self._spec.shared_warmup else None
        trainer = HybridKoopmanTrainer(cfg)
        if artifact:
            try:
                trainer.warm_start_from(job.download(artifact, "warmup.pt", self._baseline.digests.get(artifact)))
            except (CheckpointCorrupt, CheckpointError) as exc:
                problem = f"the baseline's warmup checkpoint of epoch {s} cannot be used ({exc})"
                rebuilt = self._rebuild_warmup(job, s, artifact)
                trainer = HybridKoopmanTrainer(cfg)
                if rebuilt is not None:
                    trainer.warm_start_from(rebuilt)
                    job.fallback = "; ".join(filter(None, [job.fallback, f"{problem}; started from it rebuilt"]))
                    logger.warning("trial %d: %s", job.frozen.number, job.fallback)
                    return trainer, s, 0
                job.fallback = "; ".join(filter(None, [job.fallback, f"{problem}; trained from epoch 0"]))
                logger.warning("trial %d: %s", job.frozen.number, job.fallback)
                return trainer, 0, 0
            if job.fallback:
                job.fallback += f"; started from the baseline's warmup checkpoint of epoch {s}"
                logger.warning("trial %d: %s", job.frozen.number, job.fallback)
            return trainer, s, 0
        if job.fallback:
            job.fallback += "; trained from epoch 0"
            logger.warning("trial %d: %s", job.frozen.number, job.fallback)
        return trainer, 0, 0

    def _rebuild_warmup(self, job: TrainingJob, s: int, bad: str) -> Path | None:
        """The baseline's epoch-``s`` checkpoint made again after ``bad`` was found missing or corrupt: by
        rerunning the baseline's first ``s`` epochs (the same computation, so the same checkpoint), once per
        study and epoch, under a lock, and published in the main study's baseline attr for every worker.
        A worker that finds it rebuilt by another takes that one. None when it cannot be had."""
        from koopman_search.trainer.loop import HybridKoopmanTrainer

        key = layout.baseline_key(self._spec.trainer.train.seed)
        study = self._study
        with exclusive(storage_of(study), f"koopman-search warmup {self._spec.name} {key} epoch {s}"):
            with storage_task("read the baseline"):
                attrs = layout.study_attrs(study)
            stored = dict(attrs.get(key) or {})
            checkpoints = dict(stored.get("checkpoints") or {})
            digests = dict(stored.get("digests") or {})
            rebuilt = dict(stored.get("rebuilt") or {})
            current = checkpoints.get(str(s))
            try:
                if current and current != bad:  # rebuilt meanwhile by another worker
                    path = job.download(current, "warmup.pt", digests.get(current))
                    self._baseline.checkpoints[s] = current
                    self._baseline.digests[current] = digests.get(current, {})
                    return path
            except (CheckpointCorrupt, CheckpointError) as exc:
                logger.warning("the rebuilt warmup checkpoint of epoch %d cannot be used either: %s", s, exc)
                return None
            if rebuilt.get(str(s)):
                return None  # rebuilt once already: not again
            logger.warning("rebuilding the baseline's warmup checkpoint of epoch %d (the stored one is unusable)", s)
            base = HybridKoopmanTrainer(self._spec.baseline_config)
            base.fit(callback=lambda record: record.epoch >= s)
            path = base.save_checkpoint(job.scratch / f"warmup-rebuilt-{s}.pt")
            digest = file_digest(path)
            with storage_task("upload the rebuilt warmup checkpoint"):
                new = optuna.artifacts.upload_artifact(
                    artifact_store=self._store, file_path=str(path), study_or_trial=study
                )
            checkpoints[str(s)], digests[new], rebuilt[str(s)] = new, digest, True
            stored.update(checkpoints=checkpoints, digests=digests, rebuilt=rebuilt)
            with storage_task("publish the rebuilt warmup checkpoint"):
                layout.set_study_attr(study, key, stored)
            self._baseline.checkpoints[s] = new
            self._baseline.digests[new] = digest
            return path

    def _run(self, trial: optuna.Trial, job: TrainingJob) -> TrialOutcome:
        spec = self._spec
        params: dict[str, Any] = {}
        state, reason, values, pause = "FAIL", None, None, 0.0
        pruned: tuple[int | None, str | None] = (None, None)
        progress = {"epochs_run": 0, "warm": 0, "resumed": 0}
        interrupted = env = lost = False
        try:
            params, cfg = self._draw(trial)
            trainer, progress["warm"], progress["resumed"] = self._begin(trial, job, cfg)
            verdicts = self._train(trial, job, trainer, params, progress)
            last = trainer.records[-1] if trainer.records else None
            if verdicts:
                reason, pruned_epoch, pruned_by = verdicts[0]
                state, pruned = "PRUNED", (pruned_epoch, pruned_by)
            elif trainer.epoch < spec.epochs:
                interrupted = True
                reason = f"interrupted after epoch {trainer.epoch}; queued to resume from its checkpoint"
            elif last is not None:
                # rounded once, as the records are stored: every command then shows the same number
                values = tuple(_stored(float(getattr(last, m))) for m in spec.metrics)
                state = "COMPLETE"
        except KeyboardInterrupt:
            reason = "interrupted (Ctrl-C); queued to resume from its last checkpoint"
            self._finish(trial, job, "FAIL", None, reason, (None, None), interrupted=True)
            raise
        except Exception as exc:  # a failing trial never takes its worker down
            reason = f"{type(exc).__name__}: {exc}".strip()
            if is_environment_fault(exc):
                env, lost, pause = self._environment_failed(trial, job, reason)
            logger.warning("trial %d failed: %s", trial.number, reason, exc_info=logger.isEnabledFor(logging.DEBUG))
            _free_device()
        requeue = interrupted or (env and not lost)
        stored = self._finish(
            trial, job, state, values, reason, (pruned[0], pruned[1]), interrupted=requeue, pause=pause
        )
        return TrialOutcome(
            trial.number,
            "FAIL" if interrupted else state,
            _clean(params),
            values,
            reason,
            progress["epochs_run"],
            progress["warm"],
            progress["resumed"],
            job.frozen.user_attrs.get(layout.LABEL),
            trial_id_of(trial),
            stored,
            requeued=requeue and stored,  # interrupted, or failed by its environment: queued to run again
            lost=lost,
            environment=env,
        )

    def _draw(self, trial: optuna.Trial) -> tuple[dict[str, Any], TrainerConfig]:
        """The trial's parameters and trainer config; records which process runs it."""
        # the sampler reads the study and stores each parameter: a database outage here is retried, and
        # a retry finds the parameters already stored (Optuna returns a stored parameter as it is)
        with storage_task(f"draw the parameters of trial {trial.number}"):
            params = self._spec.space.suggest(trial)
        cfg = self._spec.trial_config(params)
        # which process runs it: the one to look at when the trial goes quiet
        # and its torch thread count: CPU results depend on it, so an exported trial names it
        worker = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": cfg.train.device,
            "torch_threads": _torch_threads(),
        }
        with storage_task("record the trial's worker"):
            trial.set_user_attr(layout.WORKER, worker)
        return params, cfg

    def _begin(
        self, trial: optuna.Trial, job: TrainingJob, cfg: TrainerConfig
    ) -> tuple[HybridKoopmanTrainer, int, int]:
        """The trainer to continue (:meth:`_start`), with how it starts recorded in the trial's attrs."""
        trainer, warm, resumed = self._start(job, cfg)
        start_attrs = {
            layout.EPOCHS_FROM_WARMUP: warm,
            **({layout.EPOCHS_RESUMED: resumed} if resumed else {}),
            **({layout.RESUME_FALLBACK: job.fallback} if job.fallback else {}),
        }
        with storage_task(f"record how trial {trial.number} starts"):
            for key, value in start_attrs.items():
                trial.set_user_attr(key, value)
        return trainer, warm, resumed

    def _train(
        self,
        trial: optuna.Trial,
        job: TrainingJob,
        trainer: HybridKoopmanTrainer,
        params: dict[str, Any],
        progress: dict[str, int],
    ) -> list[tuple[str, int, str]]:
        """Train to the end, a prune verdict or a stop; after every epoch checkpoint, record and judge it.
        Returns the verdicts (reason, epoch, who), at most one."""
        first_epoch = trainer.epoch + 1
        verdicts: list[tuple[str, int, str]] = []
        rungs: list[dict[str, Any]] = list(layout.trial_attrs(job.frozen).get(layout.ASHA_RUNGS) or [])

        def on_epoch(record: EpochRecord) -> bool:
            progress["epochs_run"] = record.epoch - first_epoch + 1
            _artifact_id, dropped = job.save_epoch(trainer, record, first_epoch)
            if dropped is not None:  # keep the newest checkpoint and the one before it, for a fallback
                job.remove(dropped)
            if self._on_epoch is not None:
                self._on_epoch(trial.number, record)
            verdict = self._judge.judge(trial, params, record, rungs)
            if verdict is not None:
                verdicts.append((verdict[0], record.epoch, verdict[1]))
                return True
            return self._stop.is_set()

        hook = self._on_step
        trainer.fit(callback=on_epoch, on_step=None if hook is None else lambda *at: hook(trial.number, *at))
        return verdicts

    def _environment_failed(self, trial: optuna.Trial, job: TrainingJob, reason: str) -> tuple[bool, bool, float]:
        """Count an environment failure in the trial's attrs (its retry inherits the count); (True, lost, the
        retry's pause)."""
        failures = job.count_environment_failure()
        allowed = runtime().env_retry_max  # KOOPMAN_ENV_RETRY_MAX
        lost, pause = failures > allowed, env_retry_pause(failures)
        if lost:
            logger.error("trial %d lost: its environment failed it %d times (last: %s)", trial.number, failures, reason)
        else:
            logger.warning(
                "trial %d failed by its environment (%d of %d allowed); queued again with its "
                "parameters and checkpoint, to start in %.0f s",
                trial.number,
                failures,
                allowed,
                pause,
            )
        return True, lost, pause

    def _finish(
        self,
        trial: optuna.Trial,
        job: TrainingJob,
        state: str,
        values: tuple[float, ...] | None,
        reason: str | None,
        pruned: tuple[int | None, str | None],
        interrupted: bool,
        pause: float = 0.0,
    ) -> bool:
        """Tell the study how the attempt ended; False when it was failed elsewhere meanwhile. An interrupted
        attempt is queued again, not to start for ``pause`` seconds."""
        study = self._study

        try:
            with storage_task(f"finish trial {trial.number}"):
                if state == "PRUNED":
                    trial.set_user_attr(layout.PRUNE_REASON, reason)
                    trial.set_user_attr(layout.PRUNED_EPOCH, pruned[0])
                    trial.set_user_attr(layout.PRUNED_BY, pruned[1])
                    study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
                elif state == "COMPLETE" and values is not None:
                    study.tell(trial, list(values), skip_if_finished=True)
                else:
                    trial.set_user_attr(layout.FAIL_REASON, reason or "unknown error")
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            # its heartbeat went stale (the database was out of reach longer than the grace period), so
            # another worker failed it and queued a retry, which carries on from its last checkpoint
            logger.warning(
                "trial %d was failed elsewhere while it ran here (heartbeat stale); this "
                "attempt's result is dropped and its retry continues",
                trial.number,
            )
            return False
        if interrupted:
            job.hand_back(study, pause)
        return True


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _free_device() -> None:
    """Give back cached GPU memory after a failed trial (a CUDA OOM among them)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
