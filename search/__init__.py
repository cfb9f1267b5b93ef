"""koopman-search: Optuna studies over the hybrid Koopman trainer's settings.

The public names of the study-file side live here; importing ``search`` loads neither torch, Optuna nor
SQLAlchemy (they are imported where they are used).

    spec = load_spec("studies/quickstart.toml")     # validated; raises SpecError
    params = spec.space.suggest(trial)               # the five parameters
    cfg = spec.trial_config(params)                  # a TrainerConfig
    rules = PruneRules.from_spec(spec.rules, baseline_curve)
"""

from __future__ import annotations

from koopman_search.search.errors import BaselineError, SpecError, StorageError, StudyNotFoundError
from koopman_search.search.pruning.rules import NonFiniteRule, PruneRule, PruneRules, TotalLossRule, ValPplRatioRule
from koopman_search.search.studyfile.prune_settings import RuleSettings
from koopman_search.search.studyfile.space import (
    PARAM_NAMES,
    PARAM_TO_PATH,
    CategoricalParam,
    FixedParam,
    FloatParam,
    IntParam,
    Param,
    SearchSpace,
)
from koopman_search.search.studyfile.spec import (
    BaselineSetting,
    EnqueuedTrial,
    Objective,
    StudySpec,
    load_spec,
    spec_from_dict,
)
from koopman_search.search.studyfile.urls import redact_url

__all__ = [
    "PARAM_NAMES",
    "PARAM_TO_PATH",
    "BaselineError",
    "BaselineSetting",
    "CategoricalParam",
    "EnqueuedTrial",
    "FixedParam",
    "FloatParam",
    "IntParam",
    "NonFiniteRule",
    "Objective",
    "Param",
    "PruneRule",
    "PruneRules",
    "RuleSettings",
    "SearchSpace",
    "SpecError",
    "StorageError",
    "StudyNotFoundError",
    "StudySpec",
    "TotalLossRule",
    "ValPplRatioRule",
    "load_spec",
    "redact_url",
    "spec_from_dict",
]
