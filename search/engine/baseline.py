"""The matched baseline: the study's trainer config with the Koopman loss off, same seed, same epochs.

``baseline = "auto"`` runs it once per study and seed, however many workers start together. It is a trial
of a companion study named ``<study>.baseline-seed<N>`` in the same storage:

* whoever creates that study (an atomic insert; the others get ``DuplicatedStudyError``) enqueues its one
  WAITING trial, and whoever claims that trial (an atomic WAITING → RUNNING) runs it;
* the others wait, sleeping between looks (no busy loop), until it is COMPLETE;
* it records heartbeats: if its worker dies it is failed and re-enqueued by the heartbeat callback, and the
  retry resumes from its last checkpoint; if it raises, it is FAILED with the reason, the waiters raise
  :class:`BaselineError`, and ``launch --rerun-baseline`` enqueues it again.

Its end-of-epoch checkpoints (the epochs a trial may start its Koopman loss after) go to the artifact store:
a trial with start epoch s starts from the baseline's epoch-s checkpoint (shared warmup, docs/design.md). The
per-epoch curve is also copied to the main study's system attr ``koopman_search:baseline:seed=<N>``
(:func:`search.storage.layout.baseline_key`; docs/design.md, "The stored layout") for status and review.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from koopman_search.search.engine.job import TrainingJob, env_retry_pause, is_environment_fault
from koopman_search.search.engine.study import claim_waiting_trial
from koopman_search.search.errors import BaselineError
from koopman_search.search.settings import runtime
from koopman_search.search.storage import layout
from koopman_search.search.storage.database import fail_stale_trials
from koopman_search.search.storage.layout import MatchedBaseline
from koopman_search.search.storage.retry import storage_task
from koopman_search.search.studyfile.spec import StudySpec
from koopman_search.trainer.records import EpochRecord

StepCallback = Callable[[int, int, int, int], None]  # trainer.loop.StepCallback: (epoch, epochs, step, steps)

__all__ = [
    "baseline_attr",
    "baseline_config_hash",
    "baseline_study_name",
    "ensure_baseline",
    "rerun_baseline",
    "warmup_epochs",
]

logger = logging.getLogger(__name__)

POLL_MIN, POLL_MAX = 1.0, 5.0  # seconds between looks while another worker runs the baseline
EMPTY_GRACE = 30.0  # seconds a new baseline study may stay without its run before that counts as a failure


CONFIG_HASH_ATTR = "config_hash"  # on the baseline study, and in the main study's baseline attr


def baseline_study_name(spec: StudySpec) -> str:
    """The companion study of the first trainer config the study ran with; an edited config gets
    ``<this>-<hash>`` (:func:`baseline_config_hash`)."""
    return f"{spec.name}.baseline-seed{spec.trainer.train.seed}"


def baseline_config_hash(spec: StudySpec) -> str:
    """What decides the baseline's curve: its trainer config without the keys of where it runs."""
    from koopman_search.trainer.checkpoint import RUNTIME_KEYS
    from koopman_search.trainer.config import config_to_dict

    values = config_to_dict(spec.baseline_config)
    for section, key in RUNTIME_KEYS:
        values.get(section, {}).pop(key, None)
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def baseline_attr(spec: StudySpec) -> str:
    return layout.baseline_key(spec.trainer.train.seed)


def warmup_epochs(spec: StudySpec) -> set[int]:
    """Epochs s at which a trial of this study may switch its Koopman loss on (s >= 1, s < E)."""
    param = spec.space.params.get("koopman_start_epoch")
    epochs = spec.epochs
    candidates = range(1, epochs)
    if param is None:
        s = spec.trainer.koopman.start_epoch
        return {s} if 1 <= s < epochs else set()
    return {s for s in candidates if param.contains(s)}


def _publish(study: optuna.Study, spec: StudySpec, value: dict[str, Any]) -> None:
    value = {**value, CONFIG_HASH_ATTR: baseline_config_hash(spec)}
    with storage_task("store the baseline in the study"):
        layout.set_study_attr(study, baseline_attr(spec), value)


def _open_baseline_study(spec: StudySpec, storage: RDBStorage) -> optuna.Study:
    """The baseline study of this trainer config: the first config's keeps the plain name; a study whose
    trainer config was edited since gets a companion study of its own, so that no old curve is reused."""
    digest = baseline_config_hash(spec)
    for name in (baseline_study_name(spec), f"{baseline_study_name(spec)}-{digest}"):
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="minimize")
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(storage=storage, study_name=name)
            if study.user_attrs.get(CONFIG_HASH_ATTR, digest) == digest:  # one made before hashes: the same
                return study
            logger.info(
                "the trainer config of study %s changed since its baseline ran: a new baseline %s",
                spec.name,
                f"{baseline_study_name(spec)}-{digest}",
            )
            continue
        study.set_user_attr(CONFIG_HASH_ATTR, digest)
        study.set_user_attr(layout.ROLE_ATTR, layout.BASELINE_ROLE_PREFIX + spec.name)
        study.enqueue_trial({}, user_attrs={layout.ROLE: "baseline"})
        return study
    raise BaselineError(f"the baseline study {name} of study {spec.name} was made for another trainer config")


def rerun_baseline(spec: StudySpec, storage: RDBStorage) -> bool:
    """Enqueue the baseline again after it failed. False when it is complete, queued or running."""
    study = _open_baseline_study(spec, storage)
    states = {t.state for t in study.get_trials(deepcopy=False)}
    if states & {TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING}:
        return False
    study.enqueue_trial({}, user_attrs={layout.ROLE: "baseline"})
    return True


def _failed(spec: StudySpec, reason: str) -> BaselineError:
    return BaselineError(
        f"the baseline run of study {spec.name} failed: {reason}; fix the cause, then run "
        f"`koopman-search launch {spec.path or 'STUDY.toml'} --rerun-baseline`"
    )


def ensure_baseline(
    spec: StudySpec,
    storage: RDBStorage,
    main_study: optuna.Study,
    artifact_store: Any,
    stop: threading.Event | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_step: StepCallback | None = None,
) -> MatchedBaseline:
    """The study's baseline curve: fixed from the study file, already computed, computed here, or waited
    for while another worker computes it. ``on_epoch(record)`` follows the run when it is computed here."""
    if spec.baseline.mode == "fixed":
        values = tuple(spec.baseline.values or ())
        baseline = MatchedBaseline(values, "fixed")
        if layout.study_attrs(main_study).get(baseline_attr(spec)) is None:
            _publish(main_study, spec, baseline.to_attr())
        return baseline
    stop = stop or threading.Event()
    with storage_task("open the baseline study"):
        study = _open_baseline_study(spec, storage)
    delay, announced, waited_empty = POLL_MIN, False, 0.0
    while True:
        fail_stale_trials(study)
        with storage_task("read the baseline study"):
            trials = study.get_trials(deepcopy=False)
        if not trials and waited_empty < EMPTY_GRACE:
            # the worker that just created the baseline study has not queued its run yet
            if stop.wait(POLL_MIN):
                raise BaselineError("stopped while waiting for the baseline run")
            waited_empty += POLL_MIN
            continue
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if done:
            baseline = MatchedBaseline.from_trial(done[-1])
            with storage_task("read the baseline"):
                stored = layout.study_attrs(main_study).get(baseline_attr(spec), {})
            if stored.get("state") != "complete" or stored.get(CONFIG_HASH_ATTR) != baseline_config_hash(spec):
                _publish(main_study, spec, baseline.to_attr())
            return baseline
        if any(t.state == TrialState.WAITING for t in trials):
            trial = claim_waiting_trial(study)
            if trial is not None:
                try:
                    return _run(spec, storage, study, main_study, trial, artifact_store, stop, (on_epoch, on_step))
                except _QueuedAgain as again:  # failed by its environment: run it again after a pause
                    if stop.wait(again.pause):
                        raise BaselineError("stopped while waiting to run the baseline again") from None
            continue
        if any(t.state == TrialState.RUNNING for t in trials):
            if not announced:
                logger.info("waiting for the baseline run of study %s by another worker", spec.name)
                announced = True
            if stop.wait(delay):
                raise BaselineError("stopped while waiting for the baseline run")
            delay = min(delay * 1.5, POLL_MAX)
            continue
        failed = [t for t in trials if t.state == TrialState.FAIL]
        reason = failed[-1].user_attrs.get(layout.FAIL_REASON, "unknown error") if failed else "no run"
        raise _failed(spec, reason)


def _run(
    spec: StudySpec,
    storage: RDBStorage,
    study: optuna.Study,
    main_study: optuna.Study,
    trial: optuna.Trial,
    artifact_store: Any,
    stop: threading.Event,
    hooks: tuple[Callable[[EpochRecord], None] | None, StepCallback | None] = (None, None),
) -> MatchedBaseline:
    _publish(main_study, spec, layout.baseline_state_attr("running"))
    with TrainingJob(storage, artifact_store, trial, f"the baseline of study {spec.name}") as job:
        attrs = layout.trial_attrs(job.frozen)
        checkpoints = layout.warmup_checkpoints(attrs)
        digests: dict[str, dict[str, Any]] = dict(attrs.get(layout.CHECKPOINT_DIGESTS, {}))
        last = attrs.get(layout.CHECKPOINT)
        logger.info(
            "baseline of study %s: %d epochs with the Koopman loss off%s",
            spec.name,
            spec.epochs,
            f", resuming after epoch {last['epoch']}" if last else "",
        )
        try:
            records = _train(spec, job, trial, (checkpoints, digests), stop, hooks)
        except (Exception, KeyboardInterrupt) as exc:
            _failed_run(spec, study, main_study, job, exc)
    final = records[-1]
    with storage_task("complete the baseline run"):
        study.tell(trial, final.val_ppl)
    baseline = MatchedBaseline(tuple(r.val_ppl for r in records), "auto", tuple(records), checkpoints, digests)
    _publish(main_study, spec, baseline.to_attr())
    logger.info("baseline of study %s done: val PPL %s", spec.name, ", ".join(f"{v:.1f}" for v in baseline.val_ppl))
    return baseline


def _train(
    spec: StudySpec,
    job: TrainingJob,
    trial: optuna.Trial,
    warmup: tuple[dict[int, str], dict[str, dict[str, Any]]],
    stop: threading.Event,
    hooks: tuple[Callable[[EpochRecord], None] | None, StepCallback | None],
) -> list[EpochRecord]:
    """The baseline's epochs (resumed from its last checkpoint where there is one), each checkpointed; the
    warmup epochs' checkpoints are kept and recorded in ``warmup`` (epoch -> artifact id, artifact id ->
    digest) and in the trial's attrs. Raises on a stop before the end and on a diverged curve."""
    from koopman_search.trainer.loop import HybridKoopmanTrainer

    checkpoints, digests = warmup
    on_epoch, on_step = hooks
    keep = warmup_epochs(spec) if spec.shared_warmup else set()
    cfg = spec.baseline_config
    trainer = job.resume(cfg) or HybridKoopmanTrainer(cfg)

    def record_epoch(record: EpochRecord) -> bool:
        # the checkpoints of the warmup epochs stay: trials start from them (shared warmup)
        artifact_id, dropped = job.save_epoch(trainer, record)
        if dropped is not None and dropped not in checkpoints.values():
            job.remove(dropped)  # only the warmup epochs' checkpoints and the newest two stay
        if record.epoch in keep:
            checkpoints[record.epoch] = artifact_id
            digests[artifact_id] = job.digests[artifact_id]
            with storage_task("record a warmup checkpoint"):
                layout.set_trial_attr(trial, layout.WARMUP_CHECKPOINTS, {str(k): v for k, v in checkpoints.items()})
                layout.set_trial_attr(trial, layout.CHECKPOINT_DIGESTS, digests)
        logger.info(
            "baseline epoch %d/%d: val PPL %.2f (%.1f s)", record.epoch, record.epochs, record.val_ppl, record.seconds
        )
        if on_epoch is not None:
            on_epoch(record)
        return stop.is_set()

    records = trainer.fit(callback=record_epoch, on_step=on_step)
    if trainer.stopped and trainer.epoch < spec.epochs:
        raise InterruptedError(f"stopped after epoch {trainer.epoch}")
    bad = [r.epoch for r in records if not math.isfinite(r.val_ppl)]
    if bad:  # a diverged baseline is no curve to compare with: it fails, and --rerun-baseline reruns it
        raise FloatingPointError(
            f"the baseline diverged: val PPL {records[bad[0] - 1].val_ppl} at epoch "
            f"{bad[0]} (non-finite at epochs {', '.join(map(str, bad))})"
        )
    return records


class _QueuedAgain(Exception):
    """The baseline run failed by its environment and is queued again; run it after ``pause`` seconds."""

    def __init__(self, pause: float) -> None:
        super().__init__(f"queued again, after {pause:.0f} s")
        self.pause = pause


def _failed_run(
    spec: StudySpec, study: optuna.Study, main_study: optuna.Study, job: TrainingJob, exc: BaseException
) -> NoReturn:
    """End a baseline run that raised: an interrupted one is queued to resume; one failed by its environment
    (a full disk, the artifact store or the database out of reach) is queued again to resume from its last
    checkpoint, up to ``KOOPMAN_ENV_RETRY_MAX`` times as a trial is, a doubling pause apart; any other failure
    is published as failed (``launch --rerun-baseline`` reruns it). Always raises."""
    reason = f"{type(exc).__name__}: {exc}"
    allowed = runtime().env_retry_max
    if (
        is_environment_fault(exc)
        and not isinstance(exc, (KeyboardInterrupt, InterruptedError))  # a stop, not a fault
        and (failures := job.count_environment_failure()) <= allowed
    ):
        try:
            job.fail(study, reason)
            job.hand_back(study)
        except Exception as problem:  # the environment is still down: fall through to a failed baseline
            logger.warning("the baseline's retry could not be queued: %s", problem)
        else:
            pause = env_retry_pause(failures)
            logger.warning(
                "baseline of study %s failed by its environment (%d of %d allowed): %s; queued again, resuming "
                "from its last checkpoint in %.0f s",
                spec.name,
                failures,
                allowed,
                reason,
                pause,
            )
            raise _QueuedAgain(pause) from exc
    job.fail(study, reason)
    if isinstance(exc, (KeyboardInterrupt, InterruptedError)):
        job.hand_back(study)  # the next worker resumes from its last checkpoint
        logger.warning("baseline run of study %s interrupted; queued to resume from its last checkpoint", spec.name)
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        raise BaselineError(f"baseline of study {spec.name} interrupted; it resumes on the next run") from None
    _publish(main_study, spec, layout.baseline_state_attr("failed", reason))
    logger.error("baseline of study %s failed: %s", spec.name, reason)
    raise _failed(spec, reason) from exc
