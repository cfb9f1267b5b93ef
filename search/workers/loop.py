"""What one worker does: pull trials from the study and run them until there is nothing left to run.

    spec = load_spec("studies/quickstart.toml").with_device("cuda")
    summary = run_worker(spec)

Every finished trial gets its optuna-dashboard note here (:func:`koopman_search.search.review.annotate_trial`), so that
the trial engine (:mod:`search.engine.runner`, :mod:`search.engine.baseline`) never loads the review.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from koopman_search.search.engine.baseline import ensure_baseline
from koopman_search.search.engine.job import env_retry_pause
from koopman_search.search.engine.runner import TrialOutcome, TrialRunner
from koopman_search.search.engine.study import claim_waiting_trial, load_study, next_due
from koopman_search.search.pruning.rules import unjudged_epochs
from koopman_search.search.settings import runtime
from koopman_search.search.storage.artifacts import open_artifact_store, store_problem
from koopman_search.search.storage.database import fail_stale_trials, open_storage
from koopman_search.search.storage.layout import MatchedBaseline
from koopman_search.search.storage.optuna_private import storage_of, trial_id_of
from koopman_search.search.storage.retry import storage_task
from koopman_search.search.studyfile.spec import StudySpec
from koopman_search.trainer.errors import KoopmanError
from koopman_search.trainer.records import EpochRecord

__all__ = ["WorkerSummary", "check_machine", "run_worker"]

logger = logging.getLogger(__name__)

IDLE_MIN, IDLE_MAX = 2.0, 20.0  # seconds between looks while other workers' trials may still be retried


@dataclass
class WorkerSummary:
    outcomes: list[TrialOutcome] = field(default_factory=list)
    interrupted: bool = False

    @property
    def counted(self) -> int:
        """Trials run, not counting attempts failed by their environment and queued again."""
        return sum(1 for o in self.outcomes if not o.requeued)

    @property
    def lost(self) -> list[TrialOutcome]:
        """Trials their environment failed too often to queue them again."""
        return [o for o in self.outcomes if o.lost]


def run_worker(
    spec: StudySpec,
    *,
    seed_offset: int = 0,
    max_trials: int | None = None,
    stop: threading.Event | None = None,
    on_outcome: Callable[[TrialOutcome], None] | None = None,
    on_trial_start: Callable[[int], None] | None = None,
    on_epoch: Callable[[int, EpochRecord], None] | None = None,
    on_baseline_epoch: Callable[[EpochRecord], None] | None = None,
    on_step: Callable[[int | None, int, int, int, int], None] | None = None,
    sleep: Callable[[float], bool] | None = None,
) -> WorkerSummary:
    """Pull trials from the study in ``spec.storage_url`` until its queue is empty (and no other worker's
    trial may still be retried), ``max_trials`` ran, or ``stop`` is set. The study must exist
    (``create``/``launch``); the trainer device is the spec's (:meth:`StudySpec.with_device`).

    ``seed_offset`` is added to the sampler's seed (each concurrent worker its own, or they propose the same
    parameters); the ``on_*`` callbacks report progress (``on_step``'s number is None in the baseline)."""
    stop = stop or threading.Event()
    wait = sleep or stop.wait
    check_machine(spec)  # before the shared baseline or any trial is touched
    storage = open_storage(spec.storage_url)
    study = load_study(storage, spec.name, seed_offset=seed_offset, spec=spec)
    store = open_artifact_store(spec.artifacts_dir)
    in_baseline = None if on_step is None else lambda *at: on_step(None, *at)
    baseline = ensure_baseline(spec, storage, study, store, stop=stop, on_epoch=on_baseline_epoch, on_step=in_baseline)
    _warn_baseline_over_limit(spec, baseline)
    runner = TrialRunner(spec, study, storage, store, baseline, stop=stop, on_epoch=on_epoch, on_step=on_step)
    summary = WorkerSummary()
    delay = IDLE_MIN
    env_in_a_row = 0
    while not stop.is_set() and (max_trials is None or summary.counted < max_trials):
        fail_stale_trials(study)
        trial = claim_waiting_trial(study)
        if trial is None:
            with storage_task("read running trials"):
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            due = next_due(study)  # a retry pausing after a fault of its environment
            if not running and due is None:
                break
            # another worker's trial is running (if that worker dies, its trial is queued again), or a retry
            # is pausing: look again when it is due
            if wait(delay if due is None else max(0.05, min(delay, due))):
                break
            delay = min(delay * 1.5, IDLE_MAX)
            continue
        delay = IDLE_MIN
        if on_trial_start is not None:
            on_trial_start(trial.number)
        started = time.perf_counter()
        try:
            outcome = runner.run(trial)
        except KeyboardInterrupt:
            _annotate(study, spec, baseline, trial_id_of(trial), None, store)
            raise
        logger.debug("trial %d took %.1f s", trial.number, time.perf_counter() - started)
        if outcome.stored:
            _annotate(study, spec, baseline, trial_id_of(trial), outcome.values, store)
        summary.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
        # A fault of this machine's environment (a full disk, the artifact store away) fails whatever trial
        # comes next as well: wait it out before the next claim, instead of running through the queue and
        # using up every trial's retries at once.
        env_in_a_row = env_in_a_row + 1 if outcome.environment else 0
        if env_in_a_row and _wait_out_the_environment(spec.artifacts_dir, wait, env_in_a_row):
            break
    summary.interrupted = stop.is_set()
    return summary


def _warn_baseline_over_limit(spec: StudySpec, baseline: MatchedBaseline) -> None:
    """Say where the total-loss rule does not judge, because the baseline itself is over the limit."""
    limit = spec.rules.total_loss_max
    epochs = unjudged_epochs(limit, [r.total_loss for r in baseline.records])
    if epochs:
        values = ", ".join(f"{baseline.records[e - 1].total_loss:.4g}" for e in epochs)
        logger.warning(
            "the baseline's own total loss is above total_loss_max %g at epoch(s) %s (%s): the total-loss "
            "rule does not judge trials there (the language model, not the Koopman term, is over the limit); "
            "raise total_loss_max in [rules] to judge them",
            limit,
            ", ".join(map(str, epochs)),
            values,
        )


def check_machine(spec: StudySpec) -> None:
    """What this machine must have to run the study: its trainer device and its model factory. Raises
    :class:`~trainer.errors.ConfigError`, so that a worker with a bad device or a missing module stops at
    start (exit 2, or a slot that stays down) instead of failing the shared baseline or a trial."""
    import torch

    from koopman_search.trainer.errors import ConfigError
    from koopman_search.trainer.loop import resolve_device
    from koopman_search.trainer.model import _load_factory

    name = spec.trainer.train.device
    device = resolve_device(name)
    try:
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(
            f"device {name} cannot be used on this machine ({str(exc).splitlines()[0]}), but got device={name!r}"
        ) from None
    if spec.trainer.model.factory:
        _load_factory(spec.trainer.model.factory)


def _wait_out_the_environment(
    artifacts: str, wait: Callable[[float], bool], failures: int, probes: int | None = None
) -> bool:
    """After ``failures`` trials in a row failed by the environment: pause (2 s doubling, at most 60 s), then
    go on once the artifact store takes a probe write, waiting longer each time it does not, at most
    ``probes`` times more (default ``KOOPMAN_ENV_RETRY_MAX``): a fault that lasts is left to the trials'
    own retries, which then end in a lost trial and exit 1. True when stopped meanwhile."""
    probes = runtime().env_retry_max if probes is None else probes
    pause = env_retry_pause(failures)
    for attempt in range(probes + 1):
        if wait(pause):
            return True
        problem = store_problem(artifacts)
        if problem is None or attempt == probes:
            return False
        pause = env_retry_pause(failures + attempt + 1)
        logger.warning(
            "the artifact store %s cannot take a write (%s); waiting %.0f s more before the next trial",
            artifacts,
            problem,
            pause,
        )
    return False


def _annotate(
    study: optuna.Study,
    spec: StudySpec,
    baseline: MatchedBaseline,
    trial_id: int,
    values: tuple[float, ...] | None,
    store: Any,
) -> None:
    """The finished trial's optuna-dashboard note (a side product: it never fails the worker)."""
    from koopman_search.search.review.dashboard import annotate_trial

    try:
        with storage_task("read the finished trial"):
            frozen = storage_of(study).get_trial(trial_id)
        annotate_trial(
            study, frozen, values=values, baseline_curve=baseline.val_ppl, rules=spec.rules, artifact_store=store
        )
    except (optuna.exceptions.OptunaError, sqlalchemy.exc.SQLAlchemyError, KoopmanError):
        logger.warning("could not write the dashboard note of trial id %d", trial_id, exc_info=True)
