"""The epoch judge: after every epoch of a trial, the study's rules, then asha, then Optuna's own pruner
(one objective only) say whether the trial stops, and why.

    judge = EpochJudge.for_study(spec, baseline, storage, study_id)
    verdict = judge.judge(trial, params, record)    # ("total_loss 7.14 > 7.0 at epoch 7", "rules") or None

A rung's decision is recorded in the trial's ``asha_rungs`` attr as it is made (docs/asha.md).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from koopman_search.search.pruning.asha import BASELINE_RELATIVE
from koopman_search.search.pruning.rules import PruneRules
from koopman_search.search.pruning.rungs import AshaPruner
from koopman_search.search.storage import layout
from koopman_search.search.storage.optuna_private import trial_id_of
from koopman_search.search.storage.retry import storage_task

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage

    from koopman_search.search.storage.layout import MatchedBaseline
    from koopman_search.search.studyfile.spec import StudySpec
    from koopman_search.trainer.records import EpochRecord

__all__ = ["EpochJudge"]


class EpochJudge:
    """Judges the epochs of the trials of one study (one per worker; it keeps no state of a trial but the
    rung decisions it is given)."""

    def __init__(
        self,
        rules: PruneRules,
        asha: AshaPruner | None,
        pruner: str,
        reported_metric: str | None,
        storage: BaseStorage,
        study_id: int,
    ) -> None:
        self._rules = rules
        self._asha = asha
        self._pruner = pruner
        self._metric = reported_metric  # Optuna's pruner sees this metric; None for several objectives
        self._storage = storage
        self._study_id = study_id

    @classmethod
    def for_study(cls, spec: StudySpec, baseline: MatchedBaseline, storage: BaseStorage, study_id: int) -> EpochJudge:
        rules = PruneRules.from_spec(spec.rules, baseline.val_ppl, [r.total_loss for r in baseline.records])
        asha = None
        if spec.asha is not None:
            curves = {m: [getattr(r, m) for r in baseline.records] for m in spec.metrics if m in BASELINE_RELATIVE}
            asha = AshaPruner(
                spec.asha,
                spec.metrics,
                spec.directions,
                spec.epochs,
                spec.trainer.koopman.start_epoch,
                baseline.val_ppl,
                spec.name,
                curves,
            )
        metric = None if spec.is_multi_objective else spec.metrics[0]
        return cls(rules, asha, spec.pruner, metric, storage, study_id)

    def judge(
        self, trial: optuna.Trial, params: dict[str, Any], record: EpochRecord, rungs: list[dict[str, Any]]
    ) -> tuple[str, str] | None:
        """``(reason, who)`` when the trial stops after ``record``'s epoch (who: "rules", "asha" or the
        pruner's name), else None. A rung decision is appended to ``rungs`` and stored with the trial."""
        why = self._rules.check(record)
        if why is not None:
            return why, "rules"
        if self._asha is not None:
            why, decision = self._asha.check(self._storage, self._study_id, trial_id_of(trial), params, record.epoch)
            if decision is not None:
                rungs.append(decision)
                with storage_task("record the rung's decision"):
                    layout.set_trial_attr(trial, layout.ASHA_RUNGS, rungs)
            if why is not None:
                return why, self._asha.name
        if self._metric is not None:
            value = getattr(record, self._metric)
            if math.isfinite(value):
                with storage_task("report to the pruner"):
                    trial.report(value, record.epoch)
                    stop = trial.should_prune()
                if stop:
                    return f"{self._pruner} pruner at epoch {record.epoch}", self._pruner
        return None
