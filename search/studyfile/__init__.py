"""The study file: TOML in, a validated, frozen :class:`StudySpec` out (docs/study-files.md).

    spec.py            the file's tables, checked key by key; :func:`load_spec`
    space.py           the five searched parameters (:class:`SearchSpace`)
    prune_settings.py  the ``[rules]`` table and the ``asha_*`` keys, as plain values
    urls.py            ``${VAR}`` expansion, storage and artifact locations, redaction

Reading a study file touches no storage and loads neither torch, Optuna nor SQLAlchemy.
"""

from __future__ import annotations

from koopman_search.search.studyfile.prune_settings import (
    ASHA_KEYS,
    DEFAULT_FINITE_METRICS,
    AshaSettings,
    RuleSettings,
)
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
from koopman_search.search.studyfile.urls import redact_text, redact_url

__all__ = [
    "ASHA_KEYS",
    "DEFAULT_FINITE_METRICS",
    "PARAM_NAMES",
    "PARAM_TO_PATH",
    "AshaSettings",
    "BaselineSetting",
    "CategoricalParam",
    "EnqueuedTrial",
    "FixedParam",
    "FloatParam",
    "IntParam",
    "Objective",
    "Param",
    "RuleSettings",
    "SearchSpace",
    "StudySpec",
    "load_spec",
    "redact_text",
    "redact_url",
    "spec_from_dict",
]
