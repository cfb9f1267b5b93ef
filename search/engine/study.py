"""The study as a queue: creating it, its trial budget, claiming trials, and queuing a trial again.

The budget is a queue. Creating a study enqueues the study file's listed trials first, then empty WAITING
trials up to ``n_trials`` (an empty waiting trial takes its parameters from the sampler when it runs).
Workers only ever claim WAITING trials (an atomic state change in the database), so the budget holds across
every worker and machine with no overshoot, and the listed trials run first and once. A trial whose worker
died is failed by heartbeat and re-enqueued with the same parameters; that retry does not count again.
A trial stopped on purpose (SIGTERM, Ctrl-C) is queued again by :func:`enqueue_retry` in the same way.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from koopman_search.search.errors import SpecError, StudyNotFoundError
from koopman_search.search.storage import layout
from koopman_search.search.storage.database import exclusive
from koopman_search.search.storage.layout import SPEC_ATTR, is_retry
from koopman_search.search.storage.optuna_private import storage_of, study_id_of, trial_id_of
from koopman_search.search.storage.retry import storage_task
from koopman_search.search.studyfile.spec import StudySpec

__all__ = [
    "OUTCOME_ATTRS",
    "check_stored_definition",
    "claim_waiting_trial",
    "create_or_load_study",
    "definition_changes",
    "enqueue_retry",
    "ensure_budget",
    "is_retry",
    "load_study",
    "next_due",
    "requeue_dead_trial",
]

logger = logging.getLogger(__name__)

# user attrs that describe how an attempt ended: they stay with the attempt, never with its retry
OUTCOME_ATTRS = (layout.FAIL_REASON, layout.PRUNE_REASON, layout.PRUNED_EPOCH, layout.PRUNED_BY)


def create_or_load_study(
    spec: StudySpec, storage: BaseStorage, seed_offset: int = 0, redefine: bool = False
) -> tuple[optuna.Study, bool]:
    """The study named in ``spec``: created if absent (idempotent), else loaded and checked against the
    file (:func:`check_stored_definition`; with ``redefine``, a changed definition is recorded instead of
    refused). Returns ``(study, created)``."""
    sampler = spec.make_sampler(seed_offset)
    pruner = spec.make_pruner()
    try:
        with storage_task(f"create study {spec.name}"):
            study = optuna.create_study(
                storage=storage,
                study_name=spec.name,
                directions=list(spec.directions),  # type: ignore[arg-type]
                sampler=sampler,
                pruner=pruner,
            )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        with storage_task(f"load study {spec.name}"):
            study = optuna.load_study(storage=storage, study_name=spec.name, sampler=sampler, pruner=pruner)
        created = False
        if check_stored_definition(study, spec, redefine=redefine):
            layout.store_definition(study, spec)
        directions = [d.name.lower() for d in study.directions]
        if directions != spec.directions:
            raise SpecError(
                f"study {spec.name} already exists with directions {directions}, but the study file asks "
                f"for objectives={spec.metrics} directions={spec.directions}; use another study name"
                + (f" ({spec.path}, [study.name])" if spec.path else "")
            ) from None
    if created or SPEC_ATTR not in study.user_attrs:
        layout.store_definition(study, spec)
    if study.metric_names is None:
        with warnings.catch_warnings():  # experimental in Optuna, and what optuna-dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(spec.metrics)  # optuna-dashboard and the exports name the objectives
    return study, created


# Keys of a stored definition that say where a study runs, not what it computes: they may differ between
# machines and launches (a data path mounted elsewhere, a GPU, a progress bar).
_WHERE_KEYS = frozenset(
    {"trainer.data.source", "trainer.data.cache_dir", "trainer.train.device", "trainer.train.progress"}
)
# The parts of a definition a study's trials depend on: a change there mixes two studies in one.
_COMPARED = ("search", "trainer")


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def definition_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a stored study definition and the study file's (``StudySpec.to_dict``): the
    search space, the objectives and the trainer config, as ``key: stored → now`` lines. A trainer key the
    stored definition does not have (a setting added by a later version) is not compared."""
    current = json.loads(json.dumps(current))  # as stored: tuples become lists
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for part in _COMPARED:
        old.update(_flat(stored.get(part, {}), part))
        new.update(_flat(current.get(part, {}), part))
    old["study.objectives"] = stored.get("study", {}).get("objectives")
    new["study.objectives"] = current.get("study", {}).get("objectives")
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in _WHERE_KEYS or old.get(key) == new.get(key):
            continue
        if key.startswith("trainer.") and key not in old:
            continue
        changes.append(f"{key}: {old.get(key, '(none)')!r} → {new.get(key, '(none)')!r}")
    return changes


def check_stored_definition(study: optuna.Study, spec: StudySpec, redefine: bool = False) -> bool:
    """Refuse a study this file did not define: one made by something else (trials but no stored definition),
    or one whose stored search space, objectives or trainer config differ from the file's. With ``redefine``
    the changes are logged and True is returned: the caller records the file's definition (``--redefine``).
    A study made by something else is refused whatever ``redefine`` says."""
    where = f" ({spec.path}, [study.name])" if spec.path else ""
    storage, study_id = storage_of(study), study_id_of(study)
    stored = layout.stored_definition(storage.get_study_system_attrs(study_id), study.user_attrs)
    if stored is None:
        with storage_task(f"read the trials of {spec.name}"):
            n = len(study.get_trials(deepcopy=False))
        if n:
            raise SpecError(
                f"study {spec.name} exists in this storage but was not made by koopman-search (no stored "
                f"definition, {n} trial(s)), but got name={spec.name!r}; use another study name{where}"
            )
        return False
    changes = definition_changes(stored, spec.to_dict())
    if not changes:
        return False
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    if redefine:
        logger.warning("study %s: recording the study file's new definition (--redefine): %s", spec.name, shown)
        return True
    raise SpecError(
        f"study {spec.name} was created from another definition than this study file's: {shown}; put the "
        f"file back as it was, give the changed study another name, or continue it under the new definition "
        f"with --redefine{where}"
    )


def load_study(storage: BaseStorage, name: str, seed_offset: int = 0, spec: StudySpec | None = None) -> optuna.Study:
    """Load an existing study by name, with the sampler and pruner of its study file when given."""
    kwargs: dict[str, Any] = {}
    if spec is not None:
        kwargs = {"sampler": spec.make_sampler(seed_offset), "pruner": spec.make_pruner()}
    try:
        return optuna.load_study(storage=storage, study_name=name, **kwargs)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise StudyNotFoundError(
            f"no study named {name!r} in this storage; studies there: {', '.join(names) or 'none'}"
        ) from None


PROGRESS_EVERY = 5.0  # seconds between progress lines while a large budget is queued


def ensure_budget(study: optuna.Study, spec: StudySpec, n_trials: int | None = None) -> int:
    """Enqueue the study file's listed trials (once) and empty trials up to ``n_trials`` in all.

    Idempotent: counts the trials already issued (retries excluded) and adds only what is missing.
    Returns the number of trials added.
    """
    target = n_trials if n_trials is not None else spec.n_trials
    # several launches may start together: count and top up under one lock, or each adds the missing trials
    with exclusive(storage_of(study), f"koopman-search budget {spec.name}"):
        return _top_up(study, spec, target)


def _top_up(study: optuna.Study, spec: StudySpec, target: int) -> int:
    trials = study.get_trials(deepcopy=False)
    issued = [t for t in trials if not is_retry(t)]
    labels = {t.user_attrs.get(layout.LABEL) for t in issued}
    added = 0
    for item in spec.enqueue:
        if len(issued) + added >= target:
            break
        if item.label is not None and item.label in labels:
            continue
        user_attrs = {layout.LABEL: item.label} if item.label else None
        before = len(study.get_trials(deepcopy=False))
        study.enqueue_trial(dict(item.params), user_attrs=user_attrs, skip_if_exists=item.label is None)
        # Optuna skips an unlabelled entry whose parameters a trial already has: count only what it added
        added += len(study.get_trials(deepcopy=False)) - before
    empty = target - len(issued) - added
    shown = time.monotonic()
    for i in range(empty):
        study.enqueue_trial({})
        added += 1
        if time.monotonic() - shown >= PROGRESS_EVERY:  # a budget of many thousands takes minutes to queue
            shown = time.monotonic()
            logger.info("study %s: queued %d of %d empty trial(s) so far", spec.name, i + 1, empty)
    if added:
        logger.info("study %s: %d trial(s) added to the queue (budget %d)", spec.name, added, target)
    return added


def claim_waiting_trial(study: optuna.Study) -> optuna.Trial | None:
    """Claim the oldest waiting trial (atomically: WAITING → RUNNING in the database), or None when the
    queue is empty. Never creates a trial, so the budget cannot overshoot."""
    storage = storage_of(study)
    beats = getattr(storage, "get_heartbeat_interval", lambda: None)() is not None

    def claim() -> int | None:
        now = time.time()
        for frozen in storage.get_all_trials(study_id_of(study), deepcopy=False, states=(TrialState.WAITING,)):
            if frozen.system_attrs.get(layout.NOT_BEFORE, 0.0) > now:
                continue  # a retry pausing after a fault of its environment
            trial_id = trial_id_of(frozen)
            try:
                if beats:
                    # Beat before the trial turns RUNNING: a RUNNING trial without any heartbeat is never
                    # found stale, so a worker dying between the claim and its first beat (or a claim
                    # committed just before the connection dropped) would leave it RUNNING for ever.
                    storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    with storage_task("claim a trial"):
        trial_id = claim()
    if trial_id is None:
        return None
    # a Trial reads the study for the sampler's relative search space: an outage here is retried too
    with storage_task("start the claimed trial"):
        return optuna.Trial(study, trial_id)


def next_due(study: optuna.Study) -> float | None:
    """Seconds until the earliest WAITING trial that is pausing after a fault may be claimed; None when none
    is pausing."""
    with storage_task("read the queued retries"):
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    due = [t.system_attrs.get(layout.NOT_BEFORE, 0.0) for t in waiting]
    pausing = [d for d in due if d > 0]
    return max(0.0, min(pausing) - time.time()) if pausing else None


def requeue_dead_trial(storage: BaseStorage, study_name: str, number: int, reason: str) -> bool:
    """Fail the RUNNING trial ``number`` of a worker process that died, with ``reason``, and queue it again
    at once (its retry resumes from its checkpoint). False when it is no longer RUNNING. The database gets
    10 s: a supervisor does not wait out an outage for a dead child (the heartbeat does it later)."""
    with storage_task(f"fail trial {number}", timeout=10.0):
        study = load_study(storage, study_name)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        frozen = next((t for t in running if t.number == number), None)
        if frozen is None:
            return False
        trial_id = trial_id_of(frozen)
        storage.set_trial_user_attr(trial_id, layout.FAIL_REASON, reason)
        if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
            return False
        frozen = storage.get_trial(trial_id)
    enqueue_retry(study, frozen)
    return True


def enqueue_retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, pause: float = 0.0) -> None:
    """Queue ``trial`` again with the same parameters and user attrs (its last checkpoint among them),
    marked the way Optuna's RetryHeartbeatStaleTrialCallback marks a retry. With ``pause``, no worker claims
    it for that many seconds (a fault of the environment is given time to pass)."""
    system_attrs: dict[str, Any] = {layout.FAILED_TRIAL: trial.number, layout.RETRY_HISTORY: [], **trial.system_attrs}
    system_attrs[layout.RETRY_HISTORY] = [*system_attrs[layout.RETRY_HISTORY], trial.number]
    system_attrs = {k: v for k, v in system_attrs.items() if not k.startswith("artifacts:") and k != layout.NOT_BEFORE}
    if pause > 0:
        system_attrs[layout.NOT_BEFORE] = time.time() + pause
    # the attempt's outcome stays with the attempt: a retry that completes must not show the old reason
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in OUTCOME_ATTRS}
    with storage_task(f"queue trial {trial.number} again"):
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs=user_attrs,
                system_attrs=system_attrs,
            )
        )
