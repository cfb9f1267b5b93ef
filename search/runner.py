"""Running trials: one trial end to end (:class:`TrialRunner`), and a worker's loop (:func:`run_worker`).

A trial: parameters from the sampler (or the queue) → trainer config → start from scratch, from the
baseline's warmup checkpoint, or from its own last checkpoint when it is a retry → after every epoch store
the records, checkpoint into the artifact store, apply the prune rules → COMPLETE with the objective values,
PRUNED with a reason, or FAIL with a reason. A trial's failure never takes its worker down.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from search.baseline import Baseline, ensure_baseline
from search.records import records_to_columns
from search.rules import PruneRules
from search.spec import StudySpec
from search.storage import Heartbeat, fail_stale_trials, open_artifact_store, open_storage, retrying
from search.study import claim_waiting_trial, load_study
from trainer.config import with_overrides
from trainer.records import EpochRecord

__all__ = ["TrialOutcome", "TrialRunner", "WorkerSummary", "enqueue_retry", "format_outcome", "run_worker"]

logger = logging.getLogger(__name__)

OUTCOME_ATTRS = ("fail_reason", "prune_reason", "pruned_epoch")  # user attrs that describe how an attempt ended
IDLE_MIN, IDLE_MAX = 2.0, 20.0  # seconds between looks while other workers' trials may still be retried


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


@dataclass
class WorkerSummary:
    outcomes: list[TrialOutcome] = field(default_factory=list)
    interrupted: bool = False


def enqueue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue ``trial`` again with the same parameters and user attrs (its last checkpoint among them),
    marked the way Optuna's RetryHeartbeatStaleTrialCallback marks a retry."""
    system_attrs: dict[str, Any] = {"failed_trial": trial.number, "retry_history": [],
                                    **trial.system_attrs}
    system_attrs["retry_history"] = [*system_attrs["retry_history"], trial.number]
    system_attrs = {k: v for k, v in system_attrs.items() if not k.startswith("artifacts:")}
    # the attempt's outcome stays with the attempt: a retry that completes must not show the old reason
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in OUTCOME_ATTRS}
    retrying(lambda: study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=user_attrs, system_attrs=system_attrs,
    )), f"queue trial {trial.number} again")


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
    """Runs claimed trials of one study on one device."""

    def __init__(
        self,
        spec: StudySpec,
        study: optuna.Study,
        storage: RDBStorage,
        artifact_store: Any,
        baseline: Baseline,
        device: str | None = None,
        stop: threading.Event | None = None,
        on_epoch: Callable[[int, EpochRecord], None] | None = None,
    ) -> None:
        self._spec = spec
        self._study = study
        self._storage = storage
        self._store = artifact_store
        self._baseline = baseline
        self._device = device
        self._stop = stop or threading.Event()
        self._on_epoch = on_epoch
        self._rules = PruneRules.from_spec(spec.rules, baseline.val_ppl)

    def run(self, trial: optuna.Trial) -> TrialOutcome:
        frozen = retrying(lambda: self._storage.get_trial(trial._trial_id), "read the trial")
        with Heartbeat(self._storage, trial._trial_id), tempfile.TemporaryDirectory(prefix="koopman-") as tmp:
            return self._run(trial, frozen, Path(tmp))

    def _download(self, artifact_id: str, path: Path) -> Path:
        retrying(lambda: optuna.artifacts.download_artifact(
            artifact_store=self._store, file_path=str(path), artifact_id=artifact_id), "download a checkpoint")
        return path

    def _start(self, trial: optuna.Trial, frozen: FrozenTrial, cfg: Any, tmp: Path) -> tuple[Any, int, int]:
        """The trainer to continue: (trainer, epochs_from_warmup, epochs_resumed)."""
        from trainer.loop import HybridKoopmanTrainer

        own = frozen.user_attrs.get("checkpoint")
        warm = int(frozen.user_attrs.get("epochs_from_warmup", 0))
        if own:  # a retry: continue from the last checkpoint of the attempt that died or was stopped
            trainer = HybridKoopmanTrainer.from_checkpoint(self._download(own["artifact_id"], tmp / "own.pt"),
                                                           cfg)
            return trainer, warm, trainer.epoch
        s = cfg.koopman.start_epoch
        artifact = self._baseline.checkpoints.get(s) if self._spec.shared_warmup else None
        trainer = HybridKoopmanTrainer(cfg)
        if artifact:
            trainer.warm_start_from(self._download(artifact, tmp / "warmup.pt"))
            return trainer, s, 0
        return trainer, 0, 0

    def _run(self, trial: optuna.Trial, frozen: FrozenTrial, tmp: Path) -> TrialOutcome:
        spec = self._spec
        label = frozen.user_attrs.get("label")
        params: dict[str, Any] = {}
        state, reason, values = "FAIL", None, None
        epochs_run = warm = resumed = 0
        interrupted = False
        try:
            params = spec.space.suggest(trial)
            cfg = spec.trial_config(params)
            if self._device is not None:
                cfg = with_overrides(cfg, {"train.device": self._device})
            # which process runs it: the one to look at when the trial goes quiet
            worker = {"host": socket.gethostname(), "pid": os.getpid(), "device": cfg.train.device}
            retrying(lambda: trial.set_user_attr("worker", worker), "record the trial's worker")
            trainer, warm, resumed = self._start(trial, frozen, cfg, tmp)
            first_epoch = trainer.epoch + 1
            trial.set_user_attr("epochs_from_warmup", warm)
            if resumed:
                trial.set_user_attr("epochs_resumed", resumed)
            previous: list[str] = []
            prune: list[str] = []

            def on_epoch(record: EpochRecord) -> bool:
                nonlocal epochs_run
                epochs_run = record.epoch - first_epoch + 1
                path = trainer.save_checkpoint(tmp / f"epoch_{record.epoch}.pt")
                artifact_id = retrying(lambda: optuna.artifacts.upload_artifact(
                    artifact_store=self._store, file_path=str(path), study_or_trial=trial),
                    "upload a checkpoint")
                path.unlink()
                retrying(lambda: self._record(trial, trainer.records, record, artifact_id, epochs_run,
                                              first_epoch), "record an epoch")
                for old in previous:  # keep only the newest checkpoint of this attempt
                    self._store.remove(old)
                previous[:] = [artifact_id]
                if self._on_epoch is not None:
                    self._on_epoch(trial.number, record)
                why = self._rules.check(record)
                if why is None and not spec.is_multi_objective:
                    value = getattr(record, spec.metrics[0])
                    if math.isfinite(value):
                        retrying(lambda: trial.report(value, record.epoch), "report")
                        if trial.should_prune():
                            why = f"{spec.pruner} pruner at epoch {record.epoch}"
                if why is not None:
                    prune.append(why)
                    return True
                return self._stop.is_set()

            trainer.fit(callback=on_epoch)
            last = trainer.records[-1] if trainer.records else None
            if prune:
                state, reason = "PRUNED", prune[0]
            elif trainer.epoch < spec.epochs:
                interrupted = True
                reason = f"interrupted after epoch {trainer.epoch}; queued to resume from its checkpoint"
            elif last is not None:
                values = tuple(float(getattr(last, m)) for m in spec.metrics)
                state = "COMPLETE"
        except KeyboardInterrupt:
            interrupted = True
            reason = "interrupted (Ctrl-C); queued to resume from its last checkpoint"
            self._finish(trial, "FAIL", None, reason, interrupted=True)
            raise
        except Exception as exc:  # a failing trial never takes its worker down
            reason = f"{type(exc).__name__}: {exc}".strip()
            logger.warning("trial %d failed: %s", trial.number, reason,
                           exc_info=logger.isEnabledFor(logging.DEBUG))
            _free_device()
        self._finish(trial, state, values, reason, interrupted=interrupted)
        return TrialOutcome(trial.number, "FAIL" if interrupted else state, _clean(params), values, reason,
                            epochs_run, warm, resumed, label)

    def _record(self, trial: optuna.Trial, records: list[EpochRecord], record: EpochRecord,
                artifact_id: str, epochs_run: int, first_epoch: int) -> None:
        trial.set_user_attr("records", records_to_columns(records))
        trial.set_user_attr("train_seconds", round(sum(r.seconds for r in records if r.epoch >= first_epoch), 3))
        trial.set_user_attr("checkpoint", {"epoch": record.epoch, "artifact_id": artifact_id})
        trial.set_user_attr("epochs_run", epochs_run)

    def _finish(self, trial: optuna.Trial, state: str, values: tuple[float, ...] | None, reason: str | None,
                interrupted: bool) -> None:
        study = self._study

        def tell() -> None:
            if state == "PRUNED":
                trial.set_user_attr("prune_reason", reason)
                trial.set_user_attr("pruned_epoch", _epoch_of(reason))
                study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            elif state == "COMPLETE" and values is not None:
                study.tell(trial, list(values), skip_if_finished=True)
            else:
                trial.set_user_attr("fail_reason", reason or "unknown error")
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)

        try:
            retrying(tell, f"finish trial {trial.number}")
        except optuna.exceptions.UpdateFinishedTrialError:
            # its heartbeat went stale (the database was out of reach longer than the grace period), so
            # another worker failed it and queued a retry, which carries on from its last checkpoint
            logger.warning("trial %d was failed elsewhere while it ran here (heartbeat stale); this "
                           "attempt's result is dropped and its retry continues", trial.number)
            return
        if interrupted:
            enqueue_retry(study, self._storage.get_trial(trial._trial_id))
        try:
            from search.review.dashboard import annotate_trial

            annotate_trial(study, self._storage.get_trial(trial._trial_id), values=values,
                           baseline_curve=self._baseline.val_ppl, rules=self._spec.rules)
        except ImportError:  # pragma: no cover - the review package ships with the service
            pass


def _epoch_of(reason: str | None) -> int | None:
    if reason and " at epoch " in reason:
        tail = reason.rsplit(" at epoch ", 1)[1].split()[0]
        return int(tail) if tail.isdigit() else None
    return None


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


def run_worker(
    spec: StudySpec,
    storage_url: str | None = None,
    *,
    worker_index: int = 0,
    device: str | None = None,
    max_trials: int | None = None,
    stop: threading.Event | None = None,
    on_outcome: Callable[[TrialOutcome], None] | None = None,
    on_trial_start: Callable[[int], None] | None = None,
    on_epoch: Callable[[int, EpochRecord], None] | None = None,
    on_baseline_epoch: Callable[[EpochRecord], None] | None = None,
    sleep: Callable[[float], bool] | None = None,
) -> WorkerSummary:
    """Pull trials from the study until its queue is empty (and no other worker's trial may still be
    retried), ``max_trials`` ran, or ``stop`` is set. The study must exist (``create``/``launch``).

    ``on_trial_start(number)``, ``on_epoch(number, record)``, ``on_outcome(outcome)`` and
    ``on_baseline_epoch(record)`` report progress (the worker processes of :mod:`search.workers` pass
    them on to their supervisor)."""
    stop = stop or threading.Event()
    wait = sleep or stop.wait
    storage = open_storage(storage_url or spec.storage_url)
    study = load_study(storage, spec.name, seed_offset=worker_index, spec=spec)
    store = open_artifact_store(spec.artifacts_dir)
    baseline = ensure_baseline(spec, storage, study, store, device=device, stop=stop, on_epoch=on_baseline_epoch)
    runner = TrialRunner(spec, study, storage, store, baseline, device=device, stop=stop, on_epoch=on_epoch)
    summary = WorkerSummary()
    delay = IDLE_MIN
    while not stop.is_set() and (max_trials is None or len(summary.outcomes) < max_trials):
        fail_stale_trials(study)
        trial = claim_waiting_trial(study)
        if trial is None:
            running = retrying(lambda: study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)),
                               "read running trials")
            if not running:
                break
            # another worker's trial is running: if that worker dies, its trial is queued again
            if wait(delay):
                break
            delay = min(delay * 1.5, IDLE_MAX)
            continue
        delay = IDLE_MIN
        if on_trial_start is not None:
            on_trial_start(trial.number)
        started = time.perf_counter()
        outcome = runner.run(trial)
        logger.debug("trial %d took %.1f s", trial.number, time.perf_counter() - started)
        summary.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    summary.interrupted = stop.is_set()
    return summary
