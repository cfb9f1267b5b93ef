"""What the review reads from storage: the study's rules and baseline, and each trial's stored facts.

Everything here is read from Optuna user attrs written by the search (see the storage layout: study attrs
``"koopman_search"`` and ``"baseline:seed=<seed>"``; trial attrs ``"records"``, ``"prune_reason"``, ...),
so reviewing a study never re-runs training. Malformed attrs are logged and read as missing: a review
shows what it can rather than failing on one bad trial.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from koopman_search.search.errors import StorageError
from koopman_search.search.storage import layout
from koopman_search.search.storage.layout import SPEC_ATTR, baseline_key_seed, columns_to_records
from koopman_search.search.storage.optuna_private import trial_id_of
from koopman_search.search.studyfile.space import PARAM_NAMES

__all__ = [
    "StoredBaseline",
    "StoredRules",
    "TrialFacts",
    "objective_directions",
    "objective_names",
    "read_baseline",
    "read_rules",
    "search_meta",
    "trial_facts",
]

logger = logging.getLogger(__name__)

Columns = dict[str, list[Any]]


@dataclass(frozen=True)
class StoredRules:
    """The study's prune limits, ``None`` where the study does not store one (then nothing is drawn)."""

    total_loss_max: float | None = None
    val_ppl_ratio_max: float | None = None


@dataclass(frozen=True)
class StoredBaseline:
    """The matched Koopman-off run: ``val_ppl[e - 1]`` is its val perplexity at epoch e (None if unknown)."""

    seed: int
    state: str
    val_ppl: tuple[float | None, ...]
    columns: Columns | None = None
    error: str | None = None

    def at(self, epoch: int) -> float | None:
        """Baseline val perplexity at ``epoch`` (1-based), or None when the curve does not reach it."""
        if 1 <= epoch <= len(self.val_ppl):
            return self.val_ppl[epoch - 1]
        return None

    @property
    def seconds(self) -> float:
        if not self.columns:
            return 0.0
        return sum(s for s in self.columns.get("seconds", []) if s is not None)


@dataclass(frozen=True)
class TrialFacts:
    """One trial as the review sees it: Optuna's state and values plus the search's stored attrs."""

    number: int
    trial_id: int
    state: str  # TrialState name: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    params: dict[str, Any]
    values: tuple[float, ...] | None
    columns: Columns | None
    user_attrs: dict[str, Any] = field(default_factory=dict)
    duration_s: float | None = None

    @property
    def label(self) -> str | None:
        label = self.user_attrs.get(layout.LABEL)
        return str(label) if label else None

    @property
    def prune_reason(self) -> str | None:
        reason = self.user_attrs.get(layout.PRUNE_REASON)
        return str(reason) if reason else None

    @property
    def fail_reason(self) -> str | None:
        reason = self.user_attrs.get(layout.FAIL_REASON)
        return str(reason) if reason else None

    @property
    def pruned_epoch(self) -> int | None:
        return _int_or_none(self.user_attrs.get(layout.PRUNED_EPOCH))

    @property
    def epochs_from_warmup(self) -> int:
        return _int_or_none(self.user_attrs.get(layout.EPOCHS_FROM_WARMUP)) or 0

    @property
    def last_epoch(self) -> int | None:
        """The last epoch with a record (warm-start epochs included), or the pruned epoch."""
        if self.columns and self.columns.get("epoch"):
            return int(self.columns["epoch"][-1])
        return self.pruned_epoch

    @property
    def epochs_total(self) -> int | None:
        """The epochs a full run of this trial has (``EpochRecord.epochs``)."""
        if self.columns and self.columns.get("epochs"):
            return int(self.columns["epochs"][-1])
        return None

    @property
    def epochs_run(self) -> int:
        """Epochs this trial trained itself: the stored ``epochs_run``, else its records minus the warmup."""
        stored = _int_or_none(self.user_attrs.get(layout.EPOCHS_RUN))
        if stored is not None:
            return stored
        if self.last_epoch is None:
            return 0
        return max(0, self.last_epoch - self.epochs_from_warmup)

    @property
    def epochs_saved_by_pruning(self) -> int:
        """Epochs a full run would still have trained: ``epochs - epochs_run - epochs_from_warmup``."""
        if self.state != TrialState.PRUNED.name or self.epochs_total is None:
            return 0
        return max(0, self.epochs_total - self.epochs_run - self.epochs_from_warmup)

    @property
    def pruned_by(self) -> str | None:
        """What pruned the trial: "rules", or the pruner ("asha", "median", "hyperband"); None if not pruned.
        Read from the stored ``pruned_by``, else (studies stored before it) from the reason's wording."""
        if self.state != TrialState.PRUNED.name:
            return None
        stored = self.user_attrs.get(layout.PRUNED_BY)
        if isinstance(stored, str) and stored:
            return stored
        reason = self.prune_reason or ""
        if reason.startswith("asha:"):
            return "asha"
        for pruner in ("median", "hyperband"):
            if reason.startswith(f"{pruner} pruner"):
                return pruner
        return "rules"

    @property
    def epochs_saved_by_rules(self) -> int:
        return self.epochs_saved_by_pruning if self.pruned_by == "rules" else 0

    @property
    def epochs_saved_by_pruner(self) -> int:
        return self.epochs_saved_by_pruning if self.pruned_by not in (None, "rules") else 0

    @property
    def asha_rungs(self) -> list[dict[str, Any]]:
        """The asha pruner's decisions at the rungs the trial reached (search/pruning/asha.py), oldest first."""
        stored = self.user_attrs.get(layout.ASHA_RUNGS)
        return [dict(d) for d in stored if isinstance(d, Mapping)] if isinstance(stored, list) else []

    @property
    def train_seconds(self) -> float:
        stored = self.user_attrs.get(layout.TRAIN_SECONDS)
        if isinstance(stored, (int, float)) and math.isfinite(stored):
            return float(stored)
        return 0.0

    @property
    def epoch_numbers(self) -> list[int]:
        """The epochs that have a stored record (1-based, warm-start epochs included)."""
        if not self.columns:
            return []
        return [int(e) for e in self.columns.get("epoch") or [] if e is not None]

    def metric(self, name: str) -> list[float | None]:
        """One stored record column (``None`` where NaN), or an empty list."""
        if not self.columns:
            return []
        return list(self.columns.get(name) or [])


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def search_meta(user_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The study's ``"koopman_search"`` attr, or ``{}`` for a study the search did not create."""
    meta = user_attrs.get(SPEC_ATTR)
    return dict(meta) if isinstance(meta, Mapping) else {}


def read_rules(user_attrs: Mapping[str, Any]) -> StoredRules:
    rules = search_meta(user_attrs).get("rules")
    if not isinstance(rules, Mapping):
        return StoredRules()

    def limit(key: str) -> float | None:
        value = rules.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    return StoredRules(total_loss_max=limit("total_loss_max"), val_ppl_ratio_max=limit("val_ppl_ratio_max"))


def read_columns(value: Any, where: str) -> Columns | None:
    """Stored columnar records, checked by decoding them once; None (logged) when absent or malformed."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        kind = type(value).__name__
        logger.warning("ignoring %s: records must be a mapping of columns, but got %s", where, kind)
        return None
    try:
        columns_to_records(value)
    except (StorageError, TypeError, ValueError) as exc:
        logger.warning("ignoring %s: %s", where, exc)
        return None
    return {str(k): list(v) for k, v in value.items()}


def _spec_seed(user_attrs: Mapping[str, Any]) -> int | None:
    """The trainer seed of the stored study file (``[trainer.train] seed``): the baseline the study uses."""
    meta = search_meta(user_attrs)
    seed = meta.get("trainer_seed")
    if seed is None:  # a study stored before version 2 kept the whole definition here
        spec = meta.get("spec")
        train = spec.get("trainer", {}).get("train", {}) if isinstance(spec, Mapping) else {}
        seed = train.get("seed") if isinstance(train, Mapping) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def read_baseline(user_attrs: Mapping[str, Any], seed: int | None = None) -> StoredBaseline | None:
    """The baseline of ``seed``; without one, that of the study file's trainer seed, else the lowest seed."""
    found: dict[int, Mapping[str, Any]] = {}
    for key, value in user_attrs.items():
        key_seed = baseline_key_seed(key)
        if key_seed is not None and isinstance(value, Mapping):
            found[key_seed] = value
    if not found:
        return None
    if seed is None:
        seed = _spec_seed(user_attrs)
        if seed not in found:
            seed = min(found)
            if len(found) > 1:
                logger.info("study has baselines for seeds %s; showing seed %d", sorted(found), seed)
    attr = found.get(seed)
    if attr is None:
        return None
    columns = read_columns(attr.get("records"), f"{layout.baseline_key(seed)} records")
    curve = attr.get("val_ppl")
    if not isinstance(curve, Sequence) and columns is not None:
        curve = columns.get("val_ppl")
    val_ppl: list[float | None] = []
    for value in curve if isinstance(curve, Sequence) else []:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        val_ppl.append(float(value) if ok else None)
    error = attr.get("error")
    return StoredBaseline(
        seed=seed,
        state=str(attr.get("state", "unknown")),
        val_ppl=tuple(val_ppl),
        columns=columns,
        error=str(error) if error else None,
    )


def objective_names(study: optuna.Study) -> list[str]:
    """Metric names of the objectives: the stored objectives list, else Optuna's metric names."""
    objectives = search_meta(study.user_attrs).get("objectives")
    if isinstance(objectives, Sequence) and len(objectives) == len(study.directions):
        names = [str(o.get("metric", "")) if isinstance(o, Mapping) else "" for o in objectives]
        if all(names):
            return names
    if study.metric_names and len(study.metric_names) == len(study.directions):
        return list(study.metric_names)
    if len(study.directions) == 1:
        return ["objective"]
    return [f"objective {i}" for i in range(len(study.directions))]


def objective_directions(study: optuna.Study) -> list[str]:
    return [d.name.lower() for d in study.directions]


def trial_facts(trial: FrozenTrial | optuna.Trial, values: Sequence[float] | None = None) -> TrialFacts:
    """The review's view of a trial. A running ``optuna.Trial`` (not yet told to the study) is read as
    PRUNED when it has a prune reason, FAIL with a fail reason, else COMPLETE with ``values``."""
    user_attrs = layout.trial_attrs(trial)
    if isinstance(trial, FrozenTrial):
        state = trial.state.name
        stored_values = trial.values if values is None else values
        trial_id = trial_id_of(trial)
        duration = trial.duration.total_seconds() if trial.duration is not None else None
    else:
        if user_attrs.get(layout.PRUNE_REASON):
            state = TrialState.PRUNED.name
        elif user_attrs.get(layout.FAIL_REASON):
            state = TrialState.FAIL.name
        else:
            state = TrialState.COMPLETE.name
        stored_values = values
        trial_id = trial_id_of(trial)
        duration = None
    if state != TrialState.COMPLETE.name:
        stored_values = None
    params = dict(trial.params)
    ordered = {name: params[name] for name in PARAM_NAMES if name in params}
    ordered.update({k: v for k, v in params.items() if k not in ordered})
    return TrialFacts(
        number=trial.number,
        trial_id=trial_id,
        state=state,
        params=ordered,
        values=tuple(float(v) for v in stored_values) if stored_values is not None else None,
        columns=read_columns(user_attrs.get(layout.RECORDS), f"trial {trial.number} records"),
        user_attrs=user_attrs,
        duration_s=duration,
    )
