"""Prune rules: look at one epoch's record and say why the trial should stop, or nothing.

Each rule checks its arguments once, keeps them, and decides with a run of early returns (the shape of
Optuna's ``ThresholdPruner``), but it needs no Optuna trial: the search applies the rules itself after every
epoch, which is what makes pruning work for multi-objective studies too.

    rules = PruneRules.from_spec(spec.rules, baseline_curve=[900.0, 600.0, 480.0])
    reason = rules.check(record)        # "total_loss 7.1401 > 7.0 at epoch 7" or None

Limits are strict: a value exactly at its limit is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Protocol

from koopman_search.search.errors import BaselineError
from koopman_search.search.studyfile.prune_settings import (
    RuleSettings,
    check_floor,
    check_metrics,
    positive_finite,
)
from koopman_search.trainer.errors import ConfigError
from koopman_search.trainer.records import EpochRecord

__all__ = [
    "KOOPMAN_METRICS",
    "FloorRule",
    "NonFiniteRule",
    "PruneRule",
    "PruneRules",
    "TotalLossRule",
    "ValPplRatioRule",
    "unjudged_epochs",
]

logger = logging.getLogger(__name__)

# Metrics that only mean something once the Koopman loss is on (the record's koopman_weight > 0); before
# that the trainer may leave them undefined, so NonFiniteRule skips them there.
KOOPMAN_METRICS = frozenset(
    {
        "koopman_loss",
        "val_koopman_nre",
        "val_koopman_gain",
        "phi_effective_rank",
        "state_effective_rank",
        "val_koopman_forward_ppl",
        "koopman_k_norm",
        "phi_rank_ratio",
        "phi_scale",
    }
)


class PruneRule(Protocol):
    def check(self, record: EpochRecord) -> str | None:
        """A prune reason for this epoch, or None to keep going."""


def _fmt(value: float, digits: int) -> str:
    if not math.isfinite(value):
        return str(value)
    text = f"{value:.{digits}g}"
    return text if any(c in text for c in ".en") else text + ".0"


def _over(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` with as few digits as keep them apart (7.0001 > 7.0, not 7.0 > 7.0)."""
    for digits in range(5, 18):
        shown, bound = _fmt(value, digits), _fmt(limit, digits)
        if shown != bound:
            return shown, bound
    return repr(value), repr(limit)


def unjudged_epochs(max_value: float, baseline_total_loss: Sequence[float | None]) -> list[int]:
    """The epochs (1-based) where the Koopman-off baseline's own total loss is above ``max_value``: there the
    total-loss rule does not judge a trial (see :class:`TotalLossRule`)."""
    return [e for e, v in enumerate(baseline_total_loss, 1) if v is not None and math.isfinite(v) and v > max_value]


class TotalLossRule:
    """Prune when the epoch's mean total loss (LM + weight × Koopman) is above ``max_value``.

    Only epochs with the Koopman loss on (``record.koopman_weight > 0``) are judged: before the start epoch a
    trial is pure LM training, identical to the baseline, and its first epochs' LM loss alone can be above the
    limit (ln 30000 ≈ 10.3 at step 0). The limit is about what the Koopman term does to training, so for the
    same reason an epoch where the baseline's own total loss (its LM loss: the Koopman loss is off) is above
    the limit is not judged either (``baseline_total_loss[e - 1]``, where known): a trial over the limit
    there would be blamed for the language model. The ratio rule still judges those epochs."""

    def __init__(self, max_value: float, baseline_total_loss: Sequence[float | None] = ()) -> None:
        self._max_value = positive_finite("total_loss_max", max_value)
        self._unjudged = frozenset(unjudged_epochs(self._max_value, baseline_total_loss))

    def check(self, record: EpochRecord) -> str | None:
        if record.koopman_weight <= 0:
            return None
        if record.epoch in self._unjudged:
            return None
        value = record.total_loss
        if math.isnan(value):
            return None  # NonFiniteRule's business
        if value <= self._max_value:
            return None
        shown, limit = _over(value, self._max_value)
        return f"total_loss {shown} > {limit} at epoch {record.epoch}"


class ValPplRatioRule:
    """Prune when val perplexity is above ``ratio`` × the baseline's val perplexity at the same epoch.

    ``baseline[e - 1]`` is the baseline's epoch e: early epochs are compared with early baseline epochs, never
    with the final one (that would prune every trial at its first epoch)."""

    def __init__(self, ratio: float, baseline: Sequence[float]) -> None:
        self._ratio = positive_finite("val_ppl_ratio_max", ratio)
        if not baseline:
            raise ConfigError("the baseline curve must have one val_ppl per epoch, but got baseline=[]")
        self._baseline = tuple(positive_finite(f"baseline[{i}]", value) for i, value in enumerate(baseline))

    def check(self, record: EpochRecord) -> str | None:
        epoch = record.epoch
        if not 1 <= epoch <= len(self._baseline):
            raise BaselineError(
                f"the baseline curve has no val_ppl for epoch {epoch}: it covers epochs "
                f"1..{len(self._baseline)}; rerun the baseline with the study's epochs"
            )
        value = record.val_ppl
        if math.isnan(value):
            return None  # NonFiniteRule's business
        reference = self._baseline[epoch - 1]
        limit = self._ratio * reference
        if value <= limit:
            return None
        shown, bound = _over(value, limit)
        return f"val_ppl {shown} > {self._ratio!r} × baseline {_fmt(reference, 5)} = {bound} at epoch {epoch}"


class FloorRule:
    """Prune when ``metric`` is below ``min_value`` in an epoch with the Koopman loss on; off when ``min_value``
    is 0. The collapse guards of docs/koopman-objective.md: ``phi_effective_rank`` (φ collapsed toward one
    direction) and ``val_koopman_gain`` (K no better than the identity)."""

    def __init__(self, metric: str, min_value: float) -> None:
        self._metric = metric
        self._min = check_floor(metric, min_value)

    def check(self, record: EpochRecord) -> str | None:
        if self._min == 0 or record.koopman_weight <= 0:
            return None
        value = getattr(record, self._metric)
        if math.isnan(value):
            return None  # NonFiniteRule's business, where the metric is checked at all
        if value >= self._min:
            return None
        shown, floor = _over(value, self._min)
        return f"{self._metric} {shown} < {floor} at epoch {record.epoch}"


class NonFiniteRule:
    """Prune when one of ``metrics`` is NaN or infinite. Metrics in :data:`KOOPMAN_METRICS` are checked
    only in epochs where the Koopman loss is on (``record.koopman_weight > 0``)."""

    def __init__(self, metrics: Sequence[str]) -> None:
        self._metrics = check_metrics(metrics)

    def check(self, record: EpochRecord) -> str | None:
        koopman_on = record.koopman_weight > 0
        for metric in self._metrics:
            if metric in KOOPMAN_METRICS and not koopman_on:
                continue
            value = getattr(record, metric)
            if math.isfinite(value):
                continue
            return f"{metric} is {value} at epoch {record.epoch}"
        return None


class PruneRules:
    """Several rules; :meth:`check` returns the first reason (non-finite, then total loss, then ratio)."""

    def __init__(self, rules: Sequence[PruneRule]) -> None:
        self._rules = tuple(rules)

    @classmethod
    def from_spec(
        cls, settings: RuleSettings, baseline_curve: Sequence[float], baseline_total_loss: Sequence[float | None] = ()
    ) -> PruneRules:
        """The study's rules; ``baseline_curve[e - 1]`` is the baseline's val perplexity at epoch e and
        ``baseline_total_loss[e - 1]`` its total loss (unknown for a fixed curve)."""
        return cls(
            [
                NonFiniteRule(settings.finite_metrics),
                TotalLossRule(settings.total_loss_max, baseline_total_loss),
                ValPplRatioRule(settings.val_ppl_ratio_max, baseline_curve),
                FloorRule("phi_effective_rank", settings.phi_rank_min),
                FloorRule("val_koopman_gain", settings.koopman_gain_min),
            ]
        )

    def check(self, record: EpochRecord) -> str | None:
        for rule in self._rules:
            reason = rule.check(record)
            if reason is not None:
                logger.debug("prune: %s", reason)
                return reason
        return None
