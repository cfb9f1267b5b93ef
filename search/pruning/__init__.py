"""Pruning: the study's rules (rules.py) and asha (asha.py: the decision on plain numbers; rungs.py: a trial's
rung read from the storage and decided), both judged after every epoch by the engine.

    rules = PruneRules.from_spec(spec.rules, baseline_curve)
    reason = rules.check(record)                     # "total_loss 7.14 > 7.0 at epoch 7" or None
    decide(mine, others, reduction_factor=3)         # a RungDecision

The rules and the decision load neither torch nor Optuna; :class:`AshaPruner` and :class:`EpochJudge` (after
every epoch: the rules, then asha, then Optuna's own pruner; judge.py) need the storage, so they are imported
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from koopman_search.search.pruning.asha import BASELINE_RELATIVE, PRUNED_BY, RungDecision, decide, rung_values
from koopman_search.search.pruning.rules import (
    KOOPMAN_METRICS,
    FloorRule,
    NonFiniteRule,
    PruneRule,
    PruneRules,
    TotalLossRule,
    ValPplRatioRule,
    unjudged_epochs,
)

if TYPE_CHECKING:
    from koopman_search.search.pruning.judge import EpochJudge
    from koopman_search.search.pruning.rungs import AshaPruner

__all__ = [
    "BASELINE_RELATIVE",
    "KOOPMAN_METRICS",
    "PRUNED_BY",
    "AshaPruner",
    "EpochJudge",
    "FloorRule",
    "NonFiniteRule",
    "PruneRule",
    "PruneRules",
    "RungDecision",
    "TotalLossRule",
    "ValPplRatioRule",
    "decide",
    "rung_values",
    "unjudged_epochs",
]


def __getattr__(name: str) -> Any:
    if name == "AshaPruner":
        from koopman_search.search.pruning.rungs import AshaPruner

        return AshaPruner
    if name == "EpochJudge":
        from koopman_search.search.pruning.judge import EpochJudge

        return EpochJudge
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
