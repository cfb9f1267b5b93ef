"""Running one trial end to end (:class:`TrialRunner`); the loop that feeds it is
:func:`search.workers.run_worker`.

A trial: parameters from the sampler (or the queue) → trainer config → start from scratch, from the
baseline's warmup checkpoint, or from its own last checkpoint when it is a retry → after every epoch store
the records, checkpoint into the artifact store, apply the prune rules → COMPLETE with the objective values,
PRUNED with the reason and the epoch, or FAIL with a reason. A trial's failure never takes its worker down.
"""

from __future__ import annotations

import logging
import math
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

from search import layout
from search.asha import BASELINE_RELATIVE
from search.job import CheckpointCorrupt, TrainingJob, file_digest
from search.layout import MatchedBaseline
from search.rules import PruneRules
from search.rungs import AshaPruner
from search.settings import env_setting
from search.spec import StudySpec
from search.storage import exclusive, retrying
from trainer.errors import CheckpointError
from trainer.records import EpochRecord

if TYPE_CHECKING:
    from trainer.config import TrainerConfig
    from trainer.loop import HybridKoopmanTrainer

__all__ = ["ENV_RETRY_MAX", "TrialOutcome", "TrialRunner", "format_outcome", "is_environment_fault"]

logger = logging.getLogger(__name__)

# Attempts of one trial that its environment may fail (a full disk, the artifact store, the database) before
# the trial is given up as lost; each failed attempt is queued again with its parameters and checkpoint.
ENV_RETRY_MAX = int(env_setting("KOOPMAN_ENV_RETRY_MAX"))  # search/settings.py


def is_environment_fault(exc: BaseException) -> bool:
    """True for a failure of where the trial runs, not of what it computes: an OS error (a full disk, a
    missing or corrupt checkpoint file), the storage or the artifact store out of reach, or torch failing to
    write a checkpoint file."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    from search.errors import StorageError
    from search.storage import TRANSIENT

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
    lost: bool = False  # failed by its environment ENV_RETRY_MAX times: not queued again


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}


def format_outcome(o: TrialOutcome, metrics: list[str]) -> str:
    """One progress line per finished trial."""
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in o.params.items())
    label = f" [{o.label}]" if o.label else ""
    epochs = f"{o.epochs_run} epochs run"
    if o.epochs_from_warmup:
        epochs += f", {o.epochs_from_warmup} from shared warmup"
    if o.epochs_resumed:
        epochs += f", resumed after epoch {o.epochs_resumed}"
    if o.state == "COMPLETE" and o.values is not None:
        result = "COMPLETE " + " ".join(f"{m}={v:.4g}" for m, v in zip(metrics, o.values, strict=True))
    else:
        result = f"{o.state}: {o.reason}"
    return f"trial {o.number}{label} {params} | {epochs} | {result}"


class TrialRunner:
    """Runs claimed trials of one study, each as a :class:`~search.job.TrainingJob`."""

    def __init__(
        self,
        spec: StudySpec,
        study: optuna.Study,
        storage: RDBStorage,
        artifact_store: Any,
        baseline: MatchedBaseline,
        stop: threading.Event | None = None,
        on_epoch: Callable[[int, EpochRecord], None] | None = None,
    ) -> None:
        self._spec = spec
        self._study = study
        self._storage = storage
        self._store = artifact_store
        self._baseline = baseline
        self._stop = stop or threading.Event()
        self._on_epoch = on_epoch
        self._rules = PruneRules.from_spec(spec.rules, baseline.val_ppl, [r.total_loss for r in baseline.records])
        self._asha = (
            AshaPruner(
                spec.asha,
                spec.metrics,
                spec.directions,
                spec.epochs,
                spec.trainer.koopman.start_epoch,
                baseline.val_ppl,
                spec.name,
                {m: [getattr(r, m) for r in baseline.records] for m in spec.metrics if m in BASELINE_RELATIVE},
            )
            if spec.asha is not None
            else None
        )

    def run(self, trial: optuna.Trial) -> TrialOutcome:
        with TrainingJob(self._storage, self._store, trial, f"trial {trial.number}") as job:
            return self._run(trial, job)

    def _start(self, job: TrainingJob, cfg: TrainerConfig) -> tuple[HybridKoopmanTrainer, int, int]:
        """The trainer to continue: (trainer, epochs_from_warmup, epochs_resumed). A retry resumes from its
        newest checkpoint, else the one before it, else the baseline's warmup checkpoint, else epoch 0; every
        step down is logged and kept in the :data:`~search.layout.RESUME_FALLBACK` attr."""
        from trainer.loop import HybridKoopmanTrainer

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
        from trainer.loop import HybridKoopmanTrainer

        key = layout.baseline_key(self._spec.trainer.train.seed)
        study = self._study
        with exclusive(study._storage, f"koopman-search warmup {self._spec.name} {key} epoch {s}"):
            attrs = retrying(lambda: layout.study_attrs(study), "read the baseline")
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
            new = retrying(
                lambda: optuna.artifacts.upload_artifact(
                    artifact_store=self._store, file_path=str(path), study_or_trial=study
                ),
                "upload the rebuilt warmup checkpoint",
            )
            checkpoints[str(s)], digests[new], rebuilt[str(s)] = new, digest, True
            stored.update(checkpoints=checkpoints, digests=digests, rebuilt=rebuilt)
            retrying(lambda: layout.set_study_attr(study, key, stored), "publish the rebuilt warmup checkpoint")
            self._baseline.checkpoints[s] = new
            self._baseline.digests[new] = digest
            return path

    def _run(self, trial: optuna.Trial, job: TrainingJob) -> TrialOutcome:
        spec = self._spec
        label = job.frozen.user_attrs.get(layout.LABEL)
        params: dict[str, Any] = {}
        state, reason, values, pruned_epoch, pruned_by = "FAIL", None, None, None, None
        epochs_run = warm = resumed = 0
        interrupted = env = lost = False
        try:
            # the sampler reads the study and stores each parameter: a database outage here is retried, and
            # a retry finds the parameters already stored (Optuna returns a stored parameter as it is)
            params = retrying(lambda: spec.space.suggest(trial), f"draw the parameters of trial {trial.number}")
            cfg = spec.trial_config(params)
            # which process runs it: the one to look at when the trial goes quiet
            # and its torch thread count: CPU results depend on it, so an exported trial names it
            worker = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "device": cfg.train.device,
                "torch_threads": _torch_threads(),
            }
            retrying(lambda: trial.set_user_attr(layout.WORKER, worker), "record the trial's worker")
            trainer, warm, resumed = self._start(job, cfg)
            first_epoch = trainer.epoch + 1
            start_attrs = {
                layout.EPOCHS_FROM_WARMUP: warm,
                **({layout.EPOCHS_RESUMED: resumed} if resumed else {}),
                **({layout.RESUME_FALLBACK: job.fallback} if job.fallback else {}),
            }

            def record_start() -> None:
                for key, value in start_attrs.items():
                    trial.set_user_attr(key, value)

            retrying(record_start, f"record how trial {trial.number} starts")
            prune: list[tuple[str, int, str]] = []
            rungs: list[dict[str, Any]] = list(job.frozen.user_attrs.get(layout.ASHA_RUNGS) or [])

            def on_epoch(record: EpochRecord) -> bool:
                nonlocal epochs_run
                epochs_run = record.epoch - first_epoch + 1
                _artifact_id, dropped = job.save_epoch(trainer, record, first_epoch)
                if dropped is not None:  # keep the newest checkpoint and the one before it, for a fallback
                    job.remove(dropped)
                if self._on_epoch is not None:
                    self._on_epoch(trial.number, record)
                why, by = self._rules.check(record), "rules"
                if why is None and self._asha is not None:
                    why, decision = self._asha.check(
                        self._storage, self._study._study_id, trial._trial_id, params, record.epoch
                    )
                    by = self._asha.name
                    if decision is not None:
                        rungs.append(decision)
                        retrying(lambda: trial.set_user_attr(layout.ASHA_RUNGS, rungs), "record the rung's decision")
                if why is None and not spec.is_multi_objective:
                    value = getattr(record, spec.metrics[0])
                    if math.isfinite(value):
                        retrying(lambda: trial.report(value, record.epoch), "report")
                        if retrying(trial.should_prune, "ask the pruner"):
                            why, by = f"{spec.pruner} pruner at epoch {record.epoch}", spec.pruner
                if why is not None:
                    prune.append((why, record.epoch, by))
                    return True
                return self._stop.is_set()

            trainer.fit(callback=on_epoch)
            last = trainer.records[-1] if trainer.records else None
            if prune:
                state, (reason, pruned_epoch, pruned_by) = "PRUNED", prune[0]
            elif trainer.epoch < spec.epochs:
                interrupted = True
                reason = f"interrupted after epoch {trainer.epoch}; queued to resume from its checkpoint"
            elif last is not None:
                values = tuple(float(getattr(last, m)) for m in spec.metrics)
                state = "COMPLETE"
        except KeyboardInterrupt:
            interrupted = True
            reason = "interrupted (Ctrl-C); queued to resume from its last checkpoint"
            self._finish(trial, job, "FAIL", None, reason, (None, None), interrupted=True)
            raise
        except Exception as exc:  # a failing trial never takes its worker down
            reason = f"{type(exc).__name__}: {exc}".strip()
            if is_environment_fault(exc):
                env, lost = self._environment_failed(trial, job, reason)
            logger.warning("trial %d failed: %s", trial.number, reason, exc_info=logger.isEnabledFor(logging.DEBUG))
            _free_device()
        requeue = interrupted or (env and not lost)
        stored = self._finish(trial, job, state, values, reason, (pruned_epoch, pruned_by), interrupted=requeue)
        return TrialOutcome(
            trial.number,
            "FAIL" if interrupted else state,
            _clean(params),
            values,
            reason,
            epochs_run,
            warm,
            resumed,
            label,
            trial._trial_id,
            stored,
            requeued=requeue and stored,  # interrupted, or failed by its environment: queued to run again
            lost=lost,
        )

    def _environment_failed(self, trial: optuna.Trial, job: TrainingJob, reason: str) -> tuple[bool, bool]:
        """Count an environment failure in the trial's attrs (its retry inherits the count); (True, lost)."""
        failures = int(job.frozen.user_attrs.get(layout.ENV_FAILURES, 0)) + 1
        try:
            retrying(lambda: trial.set_user_attr(layout.ENV_FAILURES, failures), "count an environment failure")
        except Exception:
            logger.warning("trial %d: its environment failure could not be counted", trial.number)
        lost = failures > ENV_RETRY_MAX
        if lost:
            logger.error("trial %d lost: its environment failed it %d times (last: %s)", trial.number, failures, reason)
        else:
            logger.warning(
                "trial %d failed by its environment (%d of %d allowed); queued again with its "
                "parameters and checkpoint",
                trial.number,
                failures,
                ENV_RETRY_MAX,
            )
        return True, lost

    def _finish(
        self,
        trial: optuna.Trial,
        job: TrainingJob,
        state: str,
        values: tuple[float, ...] | None,
        reason: str | None,
        pruned: tuple[int | None, str | None],
        interrupted: bool,
    ) -> bool:
        """Tell the study how the attempt ended; False when it was failed elsewhere meanwhile."""
        study = self._study

        def tell() -> None:
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

        try:
            retrying(tell, f"finish trial {trial.number}")
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
            job.hand_back(study)
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
