"""The stored layout: every key the search writes into Optuna's study and trial attrs, and their codecs.

A study is a plain Optuna study, so its stored facts are user attrs (and a few system attrs) that anything
holding the storage URL can read: ``koopman-search status``/``report``/``dashboard``, ``optuna-dashboard``,
a notebook. This module is the one place that names them (docs/design.md, "The stored layout"):

study user attrs
    ``koopman_search``          a summary of the study file: objectives, rules, pruner, trainer seed (:data:`SPEC_ATTR`)
study system attrs (:data:`SEARCH_ATTR_PREFIX`; :func:`study_attrs` reads them with the user attrs)
    ``koopman_search:baseline:seed=<N>``   the matched baseline of trainer seed N (:func:`baseline_key`;
                                studies stored before it keep it as the user attr ``baseline:seed=<N>``)
trial system attrs (:data:`SEARCH_ATTR_PREFIX`; the bulky ones, :data:`BULKY_TRIAL_ATTRS`, out of the
dashboard's "User Attributes" table; :func:`trial_attrs` reads them with the user attrs, prefix stripped)
    ``koopman_search:records``     per-epoch records in columns (:func:`records_to_columns`), warmup epochs included
    ``koopman_search:checkpoint``  ``{"epoch", "artifact_id", "size", "sha256", "previous"}`` of the attempt's
                                newest checkpoint (its size and digest; ``previous``: the one before it)
    ``koopman_search:asha_rungs``  the asha pruner's decision at each rung the trial reached (search/pruning/asha.py)
    (trials stored before keep them as user attrs ``records``, ``checkpoint``, ``asha_rungs``; read the same)
trial user attrs
    ``epochs_run`` / ``epochs_from_warmup`` / ``epochs_resumed`` / ``train_seconds`` / ``worker`` / ``label``
    ``fail_reason`` / ``prune_reason`` / ``pruned_epoch`` / ``pruned_by``   how the attempt ended
    ``koopman_search:definition``   the whole study file as stored at creation (:data:`SPEC_DEFINITION_ATTR`)
the baseline's own trial (in the companion study ``<study>.baseline-seed<N>``)
    ``records``, ``checkpoint`` as above, ``checkpoints`` (epoch -> artifact id of the warmup checkpoints) and
    ``checkpoint_digests``, system attrs like them
trial system attrs (Optuna's retry marks)
    ``failed_trial`` / ``retry_history``: set on a trial queued again after its attempt died or stopped

A trial's ``records`` is one list per :data:`trainer.records.RECORD_FIELDS` name, epoch by epoch::

    {"epoch": [1, 2, 3], "lm_loss": [6.91, 6.52, 6.40], ..., "val_koopman_nre": [None, None, 0.41]}

Columns keep the stored JSON small and read straight into plots. Floats are rounded to
:data:`SIGNIFICANT_DIGITS` significant digits; NaN and ±Inf become ``None`` (JSON has no NaN), and
``None`` reads back as NaN.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from koopman_search.search.errors import StorageError
from koopman_search.search.storage.optuna_private import storage_of, study_id_of, trial_id_of
from koopman_search.trainer.records import RECORD_FIELDS, EpochRecord

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial, TrialState

    from koopman_search.search.studyfile.spec import StudySpec

__all__ = [
    "ASHA_RUNGS",
    "BASELINE_ROLE_PREFIX",
    "BULKY_TRIAL_ATTRS",
    "CHECKPOINT",
    "CURVES_IMAGE",
    "EPOCHS_FROM_WARMUP",
    "EPOCHS_RESUMED",
    "EPOCHS_RUN",
    "FAILED_TRIAL",
    "FAIL_REASON",
    "FIXED_PARAMS",
    "LABEL",
    "NOT_BEFORE",
    "PRUNED_BY",
    "PRUNED_EPOCH",
    "PRUNE_REASON",
    "RECORDS",
    "RETRY_HISTORY",
    "ROLE",
    "ROLE_ATTR",
    "SEARCH_ATTR_PREFIX",
    "SIGNIFICANT_DIGITS",
    "SPEC_ATTR",
    "SPEC_DEFINITION_ATTR",
    "SPEC_VERSION",
    "TRAIN_SECONDS",
    "WARMUP_CHECKPOINTS",
    "WORKER",
    "MatchedBaseline",
    "baseline_key",
    "baseline_key_seed",
    "baseline_state_attr",
    "checkpoint_pointer",
    "columns_to_records",
    "epoch_attrs",
    "finished_trial",
    "is_retry",
    "records_to_columns",
    "retry_of",
    "round_significant",
    "set_study_attr",
    "set_trial_attr",
    "spec_attr",
    "split_trial_attrs",
    "store_definition",
    "stored_definition",
    "study_attrs",
    "trial_attrs",
    "warmup_checkpoints",
]

# ---- study user attrs
SPEC_ATTR = "koopman_search"
SPEC_VERSION = 2  # 1: the whole definition in SPEC_ATTR; 2: a summary there, the definition in a system attr
# Study system attrs of the search carry this prefix: the bulky ones (the whole study definition, the
# baseline's records), out of the way of the dashboard's "Study User Attributes" and of `optuna studies`,
# which show every user attr as raw JSON. study_attrs() reads them with the user attrs, prefix stripped.
SEARCH_ATTR_PREFIX = "koopman_search:"
SPEC_DEFINITION_ATTR = SEARCH_ATTR_PREFIX + "definition"  # the whole study definition (StudySpec.to_dict())
ROLE_ATTR = "koopman_search_role"  # on a companion study: what it is for ("baseline of study X")
BASELINE_ROLE_PREFIX = "baseline of study "  # ROLE_ATTR of a baseline companion, before its study's name

# ---- trial user attrs
RECORDS = "records"
CHECKPOINT = "checkpoint"
EPOCHS_RUN = "epochs_run"
EPOCHS_FROM_WARMUP = "epochs_from_warmup"
EPOCHS_RESUMED = "epochs_resumed"
TRAIN_SECONDS = "train_seconds"
WORKER = "worker"
LABEL = "label"
FAIL_REASON = "fail_reason"
PRUNE_REASON = "prune_reason"
PRUNED_EPOCH = "pruned_epoch"
PRUNED_BY = "pruned_by"  # what pruned it: "rules", or the pruner ("asha", "median", "hyperband")
ASHA_RUNGS = "asha_rungs"  # the asha pruner's decisions: [{"rung", "koopman_epoch", "epoch", "rank", "of", "keep"}]
ROLE = "role"
ENV_FAILURES = "env_failures"  # attempts of this trial failed by its environment (disk, artifact store, database)
RESUME_FALLBACK = "resume_fallback"  # why an attempt did not start from its newest checkpoint
CHECKPOINT_DIGESTS = "checkpoint_digests"  # the baseline's trial: artifact id -> {"size", "sha256"}
WARMUP_CHECKPOINTS = "checkpoints"  # the baseline's trial: epoch -> artifact id, the epochs trials may start at

# Trial attrs written as system attrs (SEARCH_ATTR_PREFIX + key): one-line JSON of thousands of characters
# that would widen the dashboard's trial page past any window. trial_attrs() reads them with the user attrs.
BULKY_TRIAL_ATTRS = frozenset({RECORDS, CHECKPOINT, ASHA_RUNGS, CHECKPOINT_DIGESTS, WARMUP_CHECKPOINTS})

# ---- trial system attrs: Optuna's own marks (RetryHeartbeatStaleTrialCallback, enqueue_trial)
FAILED_TRIAL = "failed_trial"
RETRY_HISTORY = "retry_history"
# study system attr CURVES_IMAGE + ":<trial id>": the artifact id of that trial's curves image (its note shows it;
# a study artifact, as Optuna refuses new attrs on a finished trial)
CURVES_IMAGE = SEARCH_ATTR_PREFIX + "curves_image"
NOT_BEFORE = SEARCH_ATTR_PREFIX + "not_before"  # a queued retry's earliest start (Unix time): a pause after a fault
FIXED_PARAMS = "fixed_params"

_BASELINE_KEY = re.compile(r"^baseline:seed=(-?\d+)$")

SIGNIFICANT_DIGITS = 6
"""Digits kept for stored floats: enough to tell 7.0 from 7.00001 in a prune rule, small in JSON."""

_INT_FIELDS = frozenset(f.name for f in dataclasses.fields(EpochRecord) if f.type in ("int", int))
# per-block fields: one list per epoch
_LIST_FIELDS = frozenset(f.name for f in dataclasses.fields(EpochRecord) if str(f.type).startswith("list"))
# fields added after a study was stored read back as their defaults
_DEFAULTED = frozenset(
    f.name
    for f in dataclasses.fields(EpochRecord)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
)


def round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float | None:
    """``value`` rounded to ``digits`` significant digits; ``None`` for NaN and ±Inf."""
    value = float(value)
    if not math.isfinite(value):
        return None
    if value == 0.0:
        return 0.0
    return float(f"{value:.{digits}g}")


def records_to_columns(records: Sequence[EpochRecord]) -> dict[str, list[Any]]:
    """One list per record field, in epoch order as given. Empty lists for no records."""
    columns: dict[str, list[Any]] = {name: [] for name in RECORD_FIELDS}
    for record in records:
        for name in RECORD_FIELDS:
            value = getattr(record, name)
            if name in _INT_FIELDS:
                columns[name].append(int(value))
            elif name in _LIST_FIELDS:
                columns[name].append([round_significant(v) for v in value])
            else:
                columns[name].append(round_significant(value))
    return columns


def columns_to_records(columns: Mapping[str, Sequence[Any]]) -> list[EpochRecord]:
    """The records back from their columns. ``None`` becomes NaN; unknown columns are ignored.

    Raises :class:`~koopman_search.search.errors.StorageError` when a field is missing or the columns differ in length,
    which means the stored attr was not written by :func:`records_to_columns`.
    """
    missing = [name for name in RECORD_FIELDS if name not in columns and name not in _DEFAULTED]
    if missing:
        raise StorageError(f"stored records must have a column for every record field, but got missing={missing}")
    lengths = {name: len(columns[name]) for name in RECORD_FIELDS if name in columns}
    if len(set(lengths.values())) > 1:
        raise StorageError(f"stored record columns must all have one length, but got lengths={lengths}")
    count = lengths[RECORD_FIELDS[0]]
    records = []
    for i in range(count):
        values: dict[str, Any] = {}
        for name in RECORD_FIELDS:
            if name not in columns:
                continue
            value = columns[name][i]
            if name in _LIST_FIELDS:
                values[name] = [math.nan if v is None else float(v) for v in value]
            elif name in _INT_FIELDS:
                values[name] = int(value) if value is not None else 0
            else:
                values[name] = math.nan if value is None else float(value)
        records.append(EpochRecord(**values))
    return records


def baseline_key(seed: int) -> str:
    """The study user attr that holds the baseline of trainer seed ``seed``."""
    return f"baseline:seed={seed}"


def baseline_key_seed(key: str) -> int | None:
    """The seed of a :func:`baseline_key`, or None for any other key."""
    match = _BASELINE_KEY.match(key)
    return int(match.group(1)) if match else None


def checkpoint_pointer(
    epoch: int, artifact_id: str, digest: Mapping[str, Any] | None = None, previous: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The value of a :data:`CHECKPOINT` attr; with ``digest`` its ``size`` and ``sha256``, with ``previous``
    the pointer before it (without its own previous), the checkpoint a retry falls back to."""
    pointer: dict[str, Any] = {"epoch": epoch, "artifact_id": artifact_id, **(digest or {})}
    if previous:
        pointer["previous"] = {k: v for k, v in previous.items() if k != "previous"}
    return pointer


def trial_attrs(trial: Any) -> dict[str, Any]:
    """A trial's attrs as the search reads them: its user attrs, with the search's own system attrs (prefix
    stripped) over them. ``trial``: a FrozenTrial, or a live ``optuna.Trial`` (read from the storage)."""
    import optuna

    attrs = dict(trial.user_attrs)
    if isinstance(trial, optuna.trial.FrozenTrial):
        system = trial.system_attrs
    else:
        system = storage_of(trial.study).get_trial_system_attrs(trial_id_of(trial))
    for key, value in system.items():
        if key.startswith(SEARCH_ATTR_PREFIX):
            attrs[key[len(SEARCH_ATTR_PREFIX) :]] = value
    return attrs


def split_trial_attrs(attrs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(user attrs, system attrs) to store ``attrs`` as: the :data:`BULKY_TRIAL_ATTRS` as prefixed system attrs."""
    user = {k: v for k, v in attrs.items() if k not in BULKY_TRIAL_ATTRS}
    system = {SEARCH_ATTR_PREFIX + k: v for k, v in attrs.items() if k in BULKY_TRIAL_ATTRS}
    return user, system


def set_trial_attr(trial: Any, key: str, value: Any) -> None:
    """Store one attr of a live ``optuna.Trial`` where :func:`trial_attrs` reads it."""
    if key in BULKY_TRIAL_ATTRS:
        storage_of(trial.study).set_trial_system_attr(trial_id_of(trial), SEARCH_ATTR_PREFIX + key, value)
    else:
        trial.set_user_attr(key, value)


def is_retry(trial: Any) -> bool:
    """True for a trial enqueued again after its first attempt failed or was interrupted."""
    return FAILED_TRIAL in trial.system_attrs


def retry_of(trial: Any) -> int | None:
    """The number of the attempt that this retry continues, or None for a first attempt."""
    if not is_retry(trial):
        return None
    history = trial.system_attrs.get(RETRY_HISTORY) or [None]
    return history[-1]


def spec_attr(spec: StudySpec) -> dict[str, Any]:
    """The value of the :data:`SPEC_ATTR` study user attr: what a reader of the study needs at a glance (its
    objectives, rules, pruner and trainer seed); the whole definition is :data:`SPEC_DEFINITION_ATTR`."""
    return {
        "version": SPEC_VERSION,
        "definition": f"study system attr {SPEC_DEFINITION_ATTR}",
        "pruner": spec.pruner,
        "trainer_seed": spec.trainer.train.seed,
        "objectives": [o.to_dict() for o in spec.objectives],
        "rules": spec.rules.to_dict(),
    }


def study_attrs(study: Any) -> dict[str, Any]:
    """The study's attrs as the search reads them: its user attrs, with the search's own system attrs
    (prefix stripped, the definition left out) over them."""
    storage, study_id = storage_of(study), study_id_of(study)
    attrs = dict(storage.get_study_user_attrs(study_id))
    for key, value in storage.get_study_system_attrs(study_id).items():
        if key.startswith(SEARCH_ATTR_PREFIX) and key != SPEC_DEFINITION_ATTR:
            attrs[key[len(SEARCH_ATTR_PREFIX) :]] = value
    return attrs


def set_study_attr(study: Any, key: str, value: Any) -> None:
    """Store one of the search's bulky study attrs (as a system attr; :func:`study_attrs` reads it)."""
    storage_of(study).set_study_system_attr(study_id_of(study), SEARCH_ATTR_PREFIX + key, value)


def store_definition(study: Any, spec: StudySpec) -> None:
    """Write the study's definition (:data:`SPEC_DEFINITION_ATTR`) and its summary (:data:`SPEC_ATTR`)."""
    storage_of(study).set_study_system_attr(study_id_of(study), SPEC_DEFINITION_ATTR, spec.to_dict())
    study.set_user_attr(SPEC_ATTR, spec_attr(spec))


def stored_definition(system_attrs: Mapping[str, Any], user_attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The study definition stored with a study (:meth:`StudySpec.to_dict`): the system attr, or, for a study
    stored before it (version 1), the ``spec`` of the :data:`SPEC_ATTR` user attr; None when there is none."""
    definition = system_attrs.get(SPEC_DEFINITION_ATTR)
    if isinstance(definition, Mapping):
        return dict(definition)
    meta = user_attrs.get(SPEC_ATTR)
    if isinstance(meta, Mapping) and isinstance(meta.get("spec"), Mapping):
        return dict(meta["spec"])
    return None


def epoch_attrs(
    records: Sequence[EpochRecord], epoch: int, artifact_id: str | None, first_epoch: int | None = None
) -> dict[str, Any]:
    """The user attrs a run writes after ``epoch``: its records so far and its newest checkpoint; with
    ``first_epoch`` (the first epoch this attempt trained itself) also what the trial spent."""
    attrs: dict[str, Any] = {RECORDS: records_to_columns(records)}
    if artifact_id is not None:
        attrs[CHECKPOINT] = checkpoint_pointer(epoch, artifact_id)
    if first_epoch is not None:
        own = [r for r in records if r.epoch >= first_epoch]
        attrs[TRAIN_SECONDS] = round(sum(r.seconds for r in own), 3)
        attrs[EPOCHS_RUN] = epoch - first_epoch + 1
    return attrs


def finished_trial(
    state: TrialState,
    params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
    records: Sequence[EpochRecord],
    *,
    epochs_from_warmup: int = 0,
    values: Sequence[float] | None = None,
    label: str | None = None,
    prune_reason: str | None = None,
    fail_reason: str | None = None,
    checkpoint: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> FrozenTrial:
    """A trial stored the way a worker stores it (records, spend, outcome), for ``study.add_trial``:
    what the review tests and the scale benchmark build their synthetic studies from."""
    import optuna

    attrs: dict[str, Any] = {EPOCHS_FROM_WARMUP: epochs_from_warmup, **(extra or {})}
    if records:
        attrs.update(epoch_attrs(records, records[-1].epoch, checkpoint, first_epoch=epochs_from_warmup + 1))
    else:
        attrs.update({EPOCHS_RUN: 0, TRAIN_SECONDS: 0.0})
    if label:
        attrs[LABEL] = label
    if prune_reason:
        attrs[PRUNE_REASON] = prune_reason
        attrs[PRUNED_EPOCH] = records[-1].epoch
    if fail_reason:
        attrs[FAIL_REASON] = fail_reason
    user_attrs, system_attrs = split_trial_attrs(attrs)
    return optuna.trial.create_trial(
        state=state,
        params=dict(params),
        distributions=dict(distributions),
        values=list(values) if values is not None else None,
        user_attrs=user_attrs,
        system_attrs=system_attrs,
    )


# ---- the baseline


@dataclass(frozen=True)
class MatchedBaseline:
    """The matched baseline as the workers use it: its per-epoch curve, and where its warmup checkpoints are.
    :meth:`to_attr` is the value of the main study's :func:`baseline_key` attr."""

    val_ppl: tuple[float, ...]
    source: str  # "auto" | "fixed"
    records: tuple[EpochRecord, ...] = ()
    checkpoints: dict[int, str] = field(default_factory=dict)  # epoch -> artifact id
    digests: dict[str, dict[str, Any]] = field(default_factory=dict)  # artifact id -> {"size", "sha256"}

    def to_attr(self) -> dict[str, Any]:
        """The value of the main study's :func:`~koopman_search.search.storage.layout.baseline_key` attr."""
        return {
            "state": "complete" if self.source == "auto" else "fixed",
            "val_ppl": [v if math.isfinite(v) else None for v in self.val_ppl],
            "records": records_to_columns(list(self.records)) if self.records else None,
            "checkpoints": {str(k): v for k, v in self.checkpoints.items()},
            "digests": dict(self.digests),
            "error": None,
        }

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> MatchedBaseline:
        """The baseline from its own COMPLETE trial (in the companion study)."""
        attrs = trial_attrs(trial)
        records = columns_to_records(attrs[RECORDS])
        return cls(
            tuple(r.val_ppl for r in records),
            "auto",
            tuple(records),
            warmup_checkpoints(attrs),
            dict(attrs.get(CHECKPOINT_DIGESTS, {})),
        )


def warmup_checkpoints(user_attrs: Mapping[str, Any]) -> dict[int, str]:
    """The baseline trial's :data:`WARMUP_CHECKPOINTS` attr: epoch -> artifact id."""
    return {int(k): v for k, v in user_attrs.get(WARMUP_CHECKPOINTS, {}).items()}


def baseline_state_attr(state: str, error: str | None = None) -> dict[str, Any]:
    """The :func:`baseline_key` attr while the baseline has no curve yet (running) or never will (failed)."""
    return {"state": state, "val_ppl": [], "records": None, "checkpoints": {}, "error": error}
