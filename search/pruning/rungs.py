"""The asha pruner against the storage: a trial's rung, read from what every worker has stored, decided by
:func:`koopman_search.search.pruning.asha.decide` (docs/asha.md).

The decision reads what the storage holds when the trial reaches its rung (every worker writes its epoch's
record before it decides), under a storage-wide lock, so two workers at one rung decide one after the other.

    pruner = AshaPruner(spec.asha, spec.metrics, spec.directions, spec.epochs, start, baseline_val_ppl, spec.name)
    reason, decision = pruner.check(storage, study_id, trial_id, params, epoch)
    # "asha: rung 1 (Koopman epoch 3, epoch 5): rank 5 of 9 on (val_ppl, val_linear_nre), keeps top 3"
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from optuna.trial import TrialState

from koopman_search.search.pruning.asha import PRUNED_BY, decide, rung_values
from koopman_search.search.storage import layout
from koopman_search.search.storage.database import exclusive
from koopman_search.search.storage.optuna_private import trial_id_of
from koopman_search.search.storage.retry import storage_task
from koopman_search.search.studyfile.prune_settings import AshaSettings

__all__ = ["AshaPruner"]

logger = logging.getLogger(__name__)


class AshaPruner:
    """Decides at each rung of a trial, from what the storage holds (see the module's docstring)."""

    def __init__(
        self,
        settings: AshaSettings,
        metrics: Sequence[str],
        directions: Sequence[str],
        epochs: int,
        default_start: int,
        baseline_val_ppl: Sequence[float],
        study_name: str,
        baseline_curves: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = tuple(metrics)
        self._signs = tuple(-1.0 if d == "maximize" else 1.0 for d in directions)
        self._epochs = epochs
        self._default_start = default_start
        self._baseline = tuple(baseline_val_ppl)
        self._curves = {k: tuple(v) for k, v in (baseline_curves or {}).items()}
        self._lock = f"koopman-search asha {study_name}"
        self.name = PRUNED_BY

    def start_epoch(self, params: Mapping[str, Any]) -> int:
        return int(params.get("koopman_start_epoch", self._default_start))

    def rung_of(self, start: int, epoch: int) -> int | None:
        """The rung (0-based) that ``epoch`` is for a trial that starts its Koopman loss after ``start``."""
        rungs = self.settings.rungs(self._epochs - start)
        k = epoch - start
        return rungs.index(k) if k in rungs else None

    def check(
        self, storage: Any, study_id: int, trial_id: int, params: Mapping[str, Any], epoch: int
    ) -> tuple[str | None, dict[str, Any] | None]:
        """(prune reason or None, the decision to record) for the trial at ``epoch``; (None, None) off a rung.
        The trial's own record at ``epoch`` must already be stored."""
        start = self.start_epoch(params)
        rung = self.rung_of(start, epoch)
        if rung is None:
            return None, None
        k = epoch - start
        states = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        with exclusive(storage, self._lock), storage_task("read the rung's trials"):
            trials = storage.get_all_trials(study_id, deepcopy=False, states=states)
            mine, others = None, []
            for t in trials:
                other_start = self.start_epoch(t.params)
                values = rung_values(
                    layout.trial_attrs(t).get(layout.RECORDS),
                    other_start + k,
                    self._metrics,
                    self._signs,
                    self._baseline,
                    self._curves,
                )
                if values is None:
                    continue
                if trial_id_of(t) == trial_id:
                    mine = values
                else:
                    others.append(values)
            if mine is None:
                logger.warning("asha: trial %d has no stored record at epoch %d; not judged", trial_id, epoch)
                return None, None
            s = self.settings
            d = decide(mine, others, s.reduction_factor, s.min_trials)
            decision = {
                "rung": rung + 1,
                "koopman_epoch": k,
                "epoch": epoch,
                "rank": d.rank,
                "of": d.of,
                "keep": d.keep,
            }
            if d.kept:
                return None, decision
            on = ", ".join(self._metrics)
            reason = (
                f"asha: rung {rung + 1} (Koopman epoch {k}, epoch {epoch}): rank {d.rank} of {d.of} on ({on}), "
                f"keeps top {d.keep}"
            )
            return reason, decision
