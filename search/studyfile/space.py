"""The search space: five named parameters, each searched (float, int, categorical) or fixed.

A trial's parameters are sampled into a plain dict first and only then turned into a trainer config
(:meth:`SearchSpace.to_config`); the space never builds a model.

Parameter names are what Optuna records; each maps to one trainer config field (:data:`PARAM_TO_PATH`).
Fixed parameters are recorded too (as a categorical with one choice), so every trial carries all five.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from koopman_search.search.errors import SpecError
from koopman_search.trainer.config import FIT_MODES, LOSSES, SCHEDULES, TrainerConfig, with_overrides
from koopman_search.trainer.errors import ConfigError

if TYPE_CHECKING:  # optuna is imported only by whoever hands us a trial
    import optuna

__all__ = [
    "OPTIONAL_PARAMS",
    "PARAM_NAMES",
    "PARAM_TO_PATH",
    "CategoricalParam",
    "FixedParam",
    "FloatParam",
    "IntParam",
    "Param",
    "SearchSpace",
]

logger = logging.getLogger(__name__)

# Optuna parameter name -> dotted trainer config path (trainer.config.with_overrides).
PARAM_TO_PATH: Mapping[str, str] = MappingProxyType(
    {
        "koopman_weight_max": "koopman.weight_max",
        "koopman_start_epoch": "koopman.start_epoch",
        "fallback_threshold": "koopman.fallback_threshold",
        "schedule": "koopman.schedule",
        "koopman_dim": "koopman.dim",
        # beyond the user's five: the objective and the owner of K, searchable as categoricals
        "koopman_loss": "koopman.loss",
        "koopman_fit": "koopman.fit",
    }
)
PARAM_NAMES: tuple[str, ...] = tuple(PARAM_TO_PATH)
# Parameters that exist in a study only where its file declares them: left out, they stay the base
# config's value and are no parameter at all (so every study does not carry them as fixed columns).
OPTIONAL_PARAMS = frozenset({"koopman_loss", "koopman_fit"})

Value = float | int | str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML (true/false, quoted strings, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


# ---- what each parameter's values may be (its kind and the trainer's own domain) ---------------------------


@dataclass(frozen=True)
class _Domain:
    kind: str  # "float" | "int" | "str"
    check: Callable[[Any], str | None]  # -> "must be ..." or None


_KIND_NAMES = {"float": "a number", "int": "an integer", "str": "a string"}
_KIND_PLURALS = {"float": "numbers", "int": "integers", "str": "strings"}
_DECLARATIONS = {  # the declaration types a parameter of each kind accepts
    "float": ("float", "categorical", "fixed"),
    "int": ("int", "categorical", "fixed"),
    "str": ("categorical", "fixed"),
}

_DOMAINS: Mapping[str, _Domain] = MappingProxyType(
    {
        # 0 would switch the Koopman loss off: that is the baseline, not a trial
        "koopman_weight_max": _Domain("float", lambda v: None if v > 0 else "must be > 0"),
        "koopman_start_epoch": _Domain("int", lambda v: None if v >= 0 else "must be >= 0"),
        "fallback_threshold": _Domain("float", lambda v: None if v > 0 else "must be > 0"),
        "schedule": _Domain("str", lambda v: None if v in SCHEDULES else f"must be one of {', '.join(SCHEDULES)}"),
        "koopman_dim": _Domain("int", lambda v: None if v >= 1 else "must be >= 1"),
        "koopman_loss": _Domain("str", lambda v: None if v in LOSSES else f"must be one of {', '.join(LOSSES)}"),
        "koopman_fit": _Domain("str", lambda v: None if v in FIT_MODES else f"must be one of {', '.join(FIT_MODES)}"),
    }
)


def _coerce(name: str, value: Any, label: str) -> Value:
    """Check ``value``'s type for parameter ``name``; ints are accepted for floats. Raises ConfigError."""
    kind = _DOMAINS[name].kind
    ok = _is_number(value) if kind == "float" else _is_int(value) if kind == "int" else isinstance(value, str)
    if not ok:
        raise ConfigError(f"{name} must be {_KIND_NAMES[kind]}, but got {label}={_show(value)}")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, but got {label}={_show(value)}")
    return cast(Value, value)


def _in_domain(name: str, value: Value, label: str, epochs: int | None = None) -> None:
    """The trainer's own bounds; with ``epochs``, also that the start epoch leaves a Koopman epoch."""
    problem = _DOMAINS[name].check(value)
    if problem:
        raise ConfigError(f"{name} {problem}, but got {label}={_show(value)}")
    if name == "koopman_start_epoch" and epochs is not None and isinstance(value, int) and value >= epochs:
        raise ConfigError(
            f"koopman_start_epoch must be < trainer.train.epochs={epochs} so that the Koopman loss is on for "
            f"at least one epoch, but got {label}={value}"
        )


# ---- the four declarations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatParam:
    """``trial.suggest_float(name, low, high, log=log, step=step)``."""

    name: str
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ConfigError(f"low must be < high, but got low={self.low!r}, high={self.high!r}")
        if self.log and self.low <= 0:
            raise ConfigError(f"log scale needs low > 0, but got low={self.low!r}, log=true")
        if self.step is not None:
            if self.log:
                raise ConfigError(f"step cannot be combined with log, but got step={self.step!r}, log=true")
            if not self.step > 0:
                raise ConfigError(f"step must be > 0, but got step={self.step!r}")
            if not _on_grid(self.high, self.low, self.step):
                raise ConfigError(
                    f"high - low must be a multiple of step, but got low={self.low!r}, high={self.high!r}, "
                    f"step={self.step!r}"
                )

    def suggest(self, trial: optuna.trial.BaseTrial) -> float:
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        if not _is_number(value) or not self.low <= value <= self.high:
            return False
        return self.step is None or _on_grid(value, self.low, self.step)

    def describe(self) -> str:
        extra = " (log scale)" if self.log else f" (step {self.step!r})" if self.step is not None else ""
        return f"in [{self.low!r}, {self.high!r}]{extra}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "float", "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class IntParam:
    """``trial.suggest_int(name, low, high, step=step, log=log)``."""

    name: str
    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ConfigError(f"low must be <= high, but got low={self.low}, high={self.high}")
        if self.step < 1:
            raise ConfigError(f"step must be >= 1, but got step={self.step}")
        if self.log and self.low < 1:
            raise ConfigError(f"log scale needs low >= 1, but got low={self.low}, log=true")
        if self.log and self.step != 1:
            raise ConfigError(f"step cannot be combined with log, but got step={self.step}, log=true")
        if (self.high - self.low) % self.step:
            raise ConfigError(
                f"high - low must be a multiple of step, but got low={self.low}, high={self.high}, step={self.step}"
            )

    def suggest(self, trial: optuna.trial.BaseTrial) -> int:
        return trial.suggest_int(self.name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        return _is_int(value) and self.low <= value <= self.high and (value - self.low) % self.step == 0

    def describe(self) -> str:
        extra = " (log scale)" if self.log else f" (step {self.step})" if self.step != 1 else ""
        return f"in [{self.low}, {self.high}]{extra}"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "int", "low": self.low, "high": self.high, "step": self.step, "log": self.log}


@dataclass(frozen=True)
class CategoricalParam:
    """``trial.suggest_categorical(name, choices)``."""

    name: str
    choices: tuple[Value, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ConfigError("choices must not be empty, but got choices=[]")
        if len(set(self.choices)) != len(self.choices):
            raise ConfigError(f"choices must be unique, but got choices={_show(self.choices)}")

    def suggest(self, trial: optuna.trial.BaseTrial) -> Value:
        return cast(Value, trial.suggest_categorical(self.name, list(self.choices)))

    def contains(self, value: Any) -> bool:
        return not isinstance(value, bool) and value in self.choices

    def describe(self) -> str:
        return f"one of {_show(self.choices)}"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices)}


@dataclass(frozen=True)
class FixedParam:
    """Not searched. Recorded as a one-choice categorical so that every trial carries all five parameters."""

    name: str
    value: Value

    def suggest(self, trial: optuna.trial.BaseTrial) -> Value:
        return cast(Value, trial.suggest_categorical(self.name, [self.value]))

    def contains(self, value: Any) -> bool:
        return not isinstance(value, bool) and value == self.value

    def describe(self) -> str:
        return f"fixed at {_show(self.value)}"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "fixed", "value": self.value}


Param = FloatParam | IntParam | CategoricalParam | FixedParam


def _on_grid(value: float, low: float, step: float) -> bool:
    k = (value - low) / step
    return abs(k - round(k)) <= 1e-9 * max(1.0, abs(k))


# ---- the space ---------------------------------------------------------------------------------------------


class SearchSpace:
    """The five parameters, each a :data:`Param`. Build from a study file's ``[search]`` tables with
    :meth:`from_dict`; parameters left out there are fixed at the base trainer config's value."""

    def __init__(self, params: Mapping[str, Param]) -> None:
        unknown = [name for name in params if name not in PARAM_TO_PATH]
        if unknown:
            raise ConfigError(f"unknown search parameter {unknown[0]}; known parameters: {', '.join(PARAM_NAMES)}")
        for name, param in params.items():
            if param.name != name:
                raise ConfigError(f"parameter {name} is declared as {param.name}")
        self._params = dict(params)

    @property
    def params(self) -> Mapping[str, Param]:
        return MappingProxyType(self._params)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._params)

    @property
    def searched(self) -> tuple[str, ...]:
        """Names of the parameters that are not fixed."""
        return tuple(n for n, p in self._params.items() if not isinstance(p, FixedParam))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n} {p.describe()}" for n, p in self._params.items())
        return f"SearchSpace({inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self._params == other._params

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_dict(cls, tables: Mapping[str, Any], base: TrainerConfig, origin: str = "") -> SearchSpace:
        """Parse ``{"koopman_weight_max": {"type": "float", "low": ..., ...}, ...}``; raises SpecError.

        ``base`` gives the value of every parameter that is left out, and the epoch count that bounds
        ``koopman_start_epoch``."""
        epochs = base.train.epochs
        params: dict[str, Param] = {}
        for name, table in tables.items():
            key = f"search.{name}"
            if name not in PARAM_TO_PATH:
                raise SpecError.at(
                    f"unknown search parameter {name}; known parameters: {', '.join(PARAM_NAMES)}",
                    origin,
                    key,
                )
            if not isinstance(table, Mapping):
                raise SpecError.at(f"[{key}] must be a table with a type, but got {name}={_show(table)}", origin, key)
            try:
                params[name] = _parse_param(name, table, epochs)
            except ConfigError as exc:
                raise SpecError.at(str(exc), origin, key) from None
        for name in PARAM_NAMES:
            if name in params or name in OPTIONAL_PARAMS:
                continue
            path = PARAM_TO_PATH[name]
            value = _base_value(base, name)
            try:
                _in_domain(name, value, path.partition(".")[2], epochs)
            except ConfigError as exc:
                hint = f"set it in [trainer.koopman] or search it in [search.{name}]"
                raise SpecError.at(f"{exc}; {hint}", origin, f"trainer.{path}") from None
            params[name] = FixedParam(name, value)
        return cls({name: params[name] for name in PARAM_NAMES if name in params})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The ``[search]`` tables, every parameter explicit (left-out ones as ``type = "fixed"``)."""
        return {name: param.to_dict() for name, param in self._params.items()}

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Sample every parameter through ``trial.suggest_*``; fixed ones are recorded with their value."""
        return {name: param.suggest(trial) for name, param in self._params.items()}

    def validate(self, params: Mapping[str, Any], origin: str = "", where: str = "") -> dict[str, Any]:
        """Check a full assignment (e.g. an enqueued trial) against the space; return it normalised
        (ints given for floats become floats, fixed parameters filled in). Raises SpecError naming
        ``where.<param>``."""
        unknown = [name for name in params if name not in self._params]
        if unknown:
            name = unknown[0]
            raise SpecError.at(
                f"unknown parameter {name}={_show(params[name])}; known parameters: {', '.join(self.names)}",
                origin,
                f"{where}.{name}" if where else name,
            )
        out: dict[str, Any] = {}
        for name, param in self._params.items():
            key = f"{where}.{name}" if where else name
            if name not in params:
                if isinstance(param, FixedParam):
                    out[name] = param.value
                    continue
                raise SpecError.at(
                    f"{name} must be given: it is searched, {param.describe()}; add {name} = ...",
                    origin,
                    where or name,
                )
            try:
                value = _coerce(name, params[name], name)
                _in_domain(name, value, name)
            except ConfigError as exc:
                raise SpecError.at(str(exc), origin, key) from None
            if not param.contains(value):
                what = "is fixed at" if isinstance(param, FixedParam) else "must be"
                shown = param.describe().removeprefix("fixed at ")
                raise SpecError.at(f"{name} {what} {shown}, but got {name}={_show(value)}", origin, key)
            out[name] = value
        return out

    def contains(self, params: Mapping[str, Any]) -> bool:
        """Whether ``params`` is a valid full assignment for this space (see :meth:`validate`)."""
        try:
            self.validate(params)
        except SpecError:
            return False
        return True

    def to_config(self, base: TrainerConfig, params: Mapping[str, Any], origin: str = "") -> TrainerConfig:
        """``base`` with the trial's parameters written into their config fields (validated by the
        trainer config). Fixed parameters missing from ``params`` take their fixed value."""
        overrides: dict[str, Any] = {}
        for name, value in params.items():
            if name not in PARAM_TO_PATH:
                known = ", ".join(PARAM_NAMES)
                raise ConfigError(f"unknown search parameter {name}={_show(value)}; known parameters: {known}")
            overrides[PARAM_TO_PATH[name]] = value
        for name, param in self._params.items():
            if name in params:
                continue
            if not isinstance(param, FixedParam):
                raise ConfigError(f"{name} must be given: it is searched, {param.describe()}")
            overrides[PARAM_TO_PATH[name]] = param.value
        return with_overrides(base, overrides, origin)


def _base_value(base: TrainerConfig, name: str) -> Value:
    section, _, key = PARAM_TO_PATH[name].partition(".")
    return cast(Value, getattr(getattr(base, section), key))


_TABLE_KEYS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "step", "log"),
    "categorical": ("type", "choices"),
    "fixed": ("type", "value"),
}
_REQUIRED = {
    "float": ("low", "high"),
    "int": ("low", "high"),
    "categorical": ("choices",),
    "fixed": ("value",),
}


def _parse_param(name: str, table: Mapping[str, Any], epochs: int) -> Param:
    """One ``[search.<name>]`` table -> a Param. Raises ConfigError (the caller adds file and key)."""
    kind = _DOMAINS[name].kind
    allowed = _DECLARATIONS[kind]
    declared = table.get("type")
    if declared is None:
        raise ConfigError(f'type is required, one of {", ".join(allowed)}; add e.g. type = "{allowed[0]}"')
    if declared not in _TABLE_KEYS:
        raise ConfigError(f"type must be one of {', '.join(allowed)}, but got type={_show(declared)}")
    if declared not in allowed:
        raise ConfigError(
            f"{name} takes {_KIND_PLURALS[kind]}, so type must be one of "
            f"{', '.join(allowed)}, but got type={_show(declared)}"
        )
    for key, value in table.items():
        if key not in _TABLE_KEYS[declared]:
            raise ConfigError(
                f"unknown key {key}={_show(value)} for type {_show(declared)}; known keys: "
                f"{', '.join(_TABLE_KEYS[declared])}"
            )
    for key in _REQUIRED[declared]:
        if key not in table:
            raise ConfigError(f"{key} is required for type {_show(declared)}; add {key} = ...")

    def flag(key: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, but got {key}={_show(value)}")
        return value

    def bound(key: str) -> Value:
        value = _coerce(name, table[key], key)
        _in_domain(name, value, key, epochs)
        return value

    if declared == "float":
        step = table.get("step")
        if step is not None:
            if not _is_number(step):
                raise ConfigError(f"step must be a number, but got step={_show(step)}")
            step = float(step)
        return FloatParam(name, float(bound("low")), float(bound("high")), log=flag("log"), step=step)
    if declared == "int":
        step = table.get("step", 1)
        if not _is_int(step):
            raise ConfigError(f"step must be an integer, but got step={_show(step)}")
        return IntParam(name, int(bound("low")), int(bound("high")), step=step, log=flag("log"))
    if declared == "categorical":
        choices = table["choices"]
        if not isinstance(choices, list):
            raise ConfigError(f"choices must be a list, but got choices={_show(choices)}")
        values = []
        for choice in choices:
            try:
                value = _coerce(name, choice, "choices")
            except ConfigError:
                raise ConfigError(
                    f"choices of {name} must be {_KIND_PLURALS[kind]}, but got choices={_show(choices)}"
                ) from None
            _in_domain(name, value, "choices", epochs)
            values.append(value)
        return CategoricalParam(name, tuple(values))
    return FixedParam(name, bound("value"))
