"""The study file's pruning settings: the ``[rules]`` table (:class:`RuleSettings`) and the ``asha_*`` keys of
``[study]`` (:class:`AshaSettings`), each checked once when the file is read.

The rules and the asha decision that use them are in search/pruning/; these are plain values, so that reading a
study file needs neither the pruners nor a storage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from koopman_search.search.errors import SpecError
from koopman_search.trainer.errors import ConfigError
from koopman_search.trainer.records import RECORD_FIELDS

__all__ = [
    "ASHA_KEYS",
    "DEFAULT_FINITE_METRICS",
    "AshaSettings",
    "RuleSettings",
    "check_floor",
    "check_metrics",
    "positive_finite",
]

# Checked for NaN/Inf after every epoch (plus the study's objective metrics).
DEFAULT_FINITE_METRICS = ("lm_loss", "total_loss", "val_loss", "val_ppl", "koopman_loss", "val_koopman_nre")


def positive_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, but got {name}={value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, but got {name}={value!r}")
    return float(value)


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """``metrics`` once each, in order; raises ConfigError naming the first that is not a record field."""
    unknown = [m for m in metrics if m not in RECORD_FIELDS]
    if unknown:
        known = ", ".join(RECORD_FIELDS)
        raise ConfigError(f"metrics must be EpochRecord fields ({known}), but got metric={unknown[0]!r}")
    return tuple(dict.fromkeys(metrics))


def check_floor(metric: str, min_value: Any) -> float:
    """A collapse guard's floor on ``metric``: a finite number >= 0 (0 is off). Raises ConfigError."""
    if metric not in RECORD_FIELDS:
        raise ConfigError(f"metric must be an EpochRecord field, but got metric={metric!r}")
    if (
        isinstance(min_value, bool)
        or not isinstance(min_value, (int, float))
        or not (math.isfinite(min_value) and min_value >= 0)
    ):
        raise ConfigError(f"the {metric} floor must be a finite number >= 0, but got {min_value!r}")
    return float(min_value)


@dataclass(frozen=True)
class RuleSettings:
    """The ``[rules]`` table of a study file, plus the metrics that must stay finite."""

    total_loss_max: float = 7.0  # the user's "retune above 7.0"
    val_ppl_ratio_max: float = 1.3  # the user's "val perplexity < 1.3 × baseline"
    finite_metrics: tuple[str, ...] = DEFAULT_FINITE_METRICS
    # collapse guards, off (0) by default: the default objective cannot collapse (docs/koopman-objective.md)
    phi_rank_min: float = 0.0
    koopman_gain_min: float = 0.0

    def __post_init__(self) -> None:
        positive_finite("total_loss_max", self.total_loss_max)
        positive_finite("val_ppl_ratio_max", self.val_ppl_ratio_max)
        check_metrics(self.finite_metrics)
        check_floor("phi_effective_rank", self.phi_rank_min)
        check_floor("val_koopman_gain", self.koopman_gain_min)

    def to_dict(self) -> dict[str, float]:
        """As stored with the study (and as written in ``[rules]``); the collapse guards only where on."""
        out = {"total_loss_max": self.total_loss_max, "val_ppl_ratio_max": self.val_ppl_ratio_max}
        if self.phi_rank_min:
            out["phi_rank_min"] = self.phi_rank_min
        if self.koopman_gain_min:
            out["koopman_gain_min"] = self.koopman_gain_min
        return out


ASHA_KEYS = ("asha_reduction_factor", "asha_min_epochs", "asha_min_trials")


@dataclass(frozen=True)
class AshaSettings:
    """The ``asha_*`` keys of ``[study]``: η (``asha_reduction_factor``), the first rung's Koopman epochs and
    the trials a rung needs before it prunes (``asha_min_trials``); docs/asha.md."""

    reduction_factor: int = 3
    min_epochs: int = 1
    min_trials: int = 1

    def rungs(self, koopman_epochs: int) -> list[int]:
        """The Koopman epochs at which a trial with ``koopman_epochs`` of them is judged (its last is not a
        rung: it ends the trial)."""
        out, k = [], self.min_epochs
        while k < koopman_epochs:
            out.append(k)
            k *= self.reduction_factor
        return out

    def to_dict(self) -> dict[str, int]:
        return {
            "asha_reduction_factor": self.reduction_factor,
            "asha_min_epochs": self.min_epochs,
            "asha_min_trials": self.min_trials,
        }

    @classmethod
    def from_study(cls, study: Mapping[str, Any], pruner: str, epochs: int, origin: str) -> AshaSettings | None:
        """The settings of a ``[study]`` table; None when the pruner is not "asha". Raises SpecError."""
        given = [k for k in ASHA_KEYS if k in study]
        if pruner != "asha":
            if given:
                raise SpecError.at(
                    f'{given[0]} applies only with pruner = "asha", but got pruner={pruner!r}',
                    origin,
                    f"study.{given[0]}",
                )
            return None
        values: dict[str, int] = {}
        for key, default, low in (
            ("asha_reduction_factor", cls.reduction_factor, 2),
            ("asha_min_epochs", cls.min_epochs, 1),
            ("asha_min_trials", cls.min_trials, 1),
        ):
            value = study.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SpecError.at(
                    f"{key} must be an integer >= {low}, but got {key}={value!r}", origin, f"study.{key}"
                )
            values[key] = value
        if values["asha_min_epochs"] >= epochs:
            raise SpecError.at(
                f"asha_min_epochs must be < trainer.train.epochs ({epochs}), but got "
                f"asha_min_epochs={values['asha_min_epochs']}: no trial would reach a rung",
                origin,
                "study.asha_min_epochs",
            )
        return cls(values["asha_reduction_factor"], values["asha_min_epochs"], values["asha_min_trials"])
