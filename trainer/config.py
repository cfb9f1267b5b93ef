"""Trainer configuration: four small frozen dataclasses and their validation.

A config is built from a mapping (a TOML file, the search space, CLI flags) with :func:`config_from_dict`,
which checks every key and value and raises :class:`ConfigError` naming the origin, the key and the value:

    fallback_threshold must be > 0, but got fallback_threshold=-1 (run.toml, [koopman.fallback_threshold])

Defaults follow the user's notebook setup (docs/design.md, "The user's setup"): WikiText-2 words, vocabulary
capped at 30000, sequence length 128, batch 32, d_model 64, 4 blocks, AdamW lr 1e-3, gradient clip 0.5,
10 epochs, Koopman dim 256.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from koopman_search.trainer.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "FALLBACK_MODES",
    "FIT_MODES",
    "LIFTINGS",
    "LOSSES",
    "SCHEDULES",
    "DataConfig",
    "KoopmanConfig",
    "ModelConfig",
    "TrainConfig",
    "TrainerConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "with_overrides",
]

SCHEDULES = ("linear", "exponential", "step", "cosine")
FALLBACK_MODES = ("relative", "absolute")  # trainer/schedule.py, FallbackState
FIT_MODES = ("gradient", "lstsq", "dmd")
# "decoder" is the well-posed default (docs/koopman-objective.md); "smooth_l1" and "mse" are the notebook's
# latent-only forms, kept to reproduce it: they can be driven to zero by shrinking φ. "normalized" (the latent
# error over φ's own spread) and "vicreg" (that plus a variance/covariance floor) are the compared alternatives.
LOSSES = ("decoder", "smooth_l1", "mse", "normalized", "vicreg")
LIFTINGS = ("mlp", "layernorm")
DEVICE_HINT = "auto, cpu, cuda or cuda:N"


def _positive(name: str, value: Any) -> str | None:
    return None if value > 0 else f"{name} must be > 0"


def _non_negative(name: str, value: Any) -> str | None:
    return None if value >= 0 else f"{name} must be >= 0"


def _unit_interval(name: str, value: Any) -> str | None:
    return None if 0 <= value <= 1 else f"{name} must be in [0, 1]"


def _open_unit(name: str, value: Any) -> str | None:
    return None if 0 <= value < 1 else f"{name} must be in [0, 1)"


def _one_of(*choices: str) -> Callable[[str, Any], str | None]:
    def check(name: str, value: Any) -> str | None:
        return None if value in choices else f"{name} must be one of {', '.join(choices)}"

    return check


def _device(name: str, value: Any) -> str | None:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return f"{name} must be {DEVICE_HINT}"


def _source(name: str, value: Any) -> str | None:
    # The form only; whether the directory or dataset exists is checked when the corpus is loaded.
    scheme, sep, rest = value.partition(":")
    dataset, slash, subset = rest.rpartition("/")
    if value == "builtin" or (sep and scheme == "files" and rest):
        return None
    if sep and scheme == "hf" and dataset and slash and subset:
        return None
    return f"{name} must be builtin, files:DIR or hf:NAME/CONFIG"


def _factory(name: str, value: Any) -> str | None:
    if value == "":
        return None
    module, _, attr = value.partition(":")
    if module and attr and all(part.isidentifier() for part in (*module.split("."), *attr.split("."))):
        return None
    return f'{name} must look like "package.module:function" (or be empty for the built-in model)'


def _attr_name(name: str, value: Any) -> str | None:
    if value == "" or all(part.isidentifier() for part in value.split(".")):
        return None
    return f'{name} must be an attribute name such as "blocks" (or empty)'


def _check(fn: Callable[[str, Any], str | None]) -> dict[str, Any]:
    return {"check": fn}


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus comes from and how it is cut into batches."""

    source: str = field(default="builtin", metadata=_check(_source))  # builtin | files:DIR | hf:NAME/CONFIG
    vocab_size: int = field(default=30000, metadata=_check(_positive))  # the notebook's 30000-word cap (docs/design.md)
    seq_len: int = field(default=128, metadata=_check(_positive))
    batch_size: int = field(default=32, metadata=_check(_positive))
    cache_dir: str = ""  # "" = $KOOPMAN_CACHE_DIR or ~/.cache/koopman-search


@dataclass(frozen=True)
class ModelConfig:
    """The language model. ``factory`` plugs in a user model (see trainer.model.HiddenStateModel)."""

    d_model: int = field(default=64, metadata=_check(_positive))
    n_layers: int = field(default=4, metadata=_check(_positive))
    n_heads: int = field(default=4, metadata=_check(_positive))
    mlp_ratio: int = field(default=4, metadata=_check(_positive))
    dropout: float = field(default=0.1, metadata=_check(_open_unit))
    factory: str = field(default="", metadata=_check(_factory))
    # For a factory model that returns only logits: the attribute holding its blocks (an nn.ModuleList);
    # each block's input and output are then captured with forward hooks (trainer/model.py).
    blocks_attr: str = field(default="", metadata=_check(_attr_name))


@dataclass(frozen=True)
class KoopmanConfig:
    """The auxiliary Koopman loss, its weight schedule and its fallback."""

    enabled: bool = True  # False = the baseline: same trainer, Koopman loss off
    dim: int = field(default=256, metadata=_check(_positive))
    lifting: str = field(default="mlp", metadata=_check(_one_of(*LIFTINGS)))
    # Weight of the isotropy term on φ inside the decoder objective (trainer/koopman.py, _isotropy_gap):
    # without it φ carries the states' information in a few large directions (effective rank 0.45-0.76 × the
    # states' own on a live run); at 1 it stays more spread than the states (docs/koopman-objective.md,
    # "Collapse"). 0 = the plain three-term decoder objective.
    spread: float = field(default=1.0, metadata=_check(_non_negative))
    loss: str = field(default="decoder", metadata=_check(_one_of(*LOSSES)))
    fit: str = field(default="gradient", metadata=_check(_one_of(*FIT_MODES)))
    update_interval: int = field(default=10, metadata=_check(_positive))  # lstsq refit period, in steps
    # lstsq ridge toward K = I, relative to the mean eigenvalue of the centred input covariance (so the same
    # setting means the same shrinkage for any Koopman dim)
    ridge: float = field(default=1e-3, metadata=_check(_positive))
    # fit = "dmd", the notebook's streaming refit: batch-mean state pairs in a circular buffer, a truncated-SVD
    # pseudo-inverse (relative threshold) once it is full, and K pulled toward it with weight alpha each step
    dmd_buffer: int = field(default=100, metadata=_check(_positive))
    dmd_alpha: float = field(default=0.1, metadata=_check(_unit_interval))
    dmd_rcond: float = field(default=1e-6, metadata=_check(_positive))
    # Tokens per batch the Koopman loss is estimated on (a uniform sample; 0 = all B*T tokens). The
    # estimate is unbiased and keeps the loss's cost a small share of the LM step; see BENCHMARKS.md.
    tokens_per_batch: int = field(default=512, metadata=_check(_non_negative))
    weight_max: float = field(default=0.5, metadata=_check(_non_negative))
    start_epoch: int = field(default=3, metadata=_check(_non_negative))
    schedule: str = field(default="linear", metadata=_check(_one_of(*SCHEDULES)))
    # fallback_mode "relative": a batch whose Koopman loss is fallback_threshold running standard deviations
    # above the running mean of the epoch's earlier batches cuts the weight; "absolute": a batch above
    # fallback_threshold itself (the notebook's form, for its raw losses). trainer/schedule.py,
    # docs/koopman-objective.md "The fallback".
    fallback_mode: str = field(default="relative", metadata=_check(_one_of(*FALLBACK_MODES)))
    fallback_threshold: float = field(default=2.0, metadata=_check(_positive))
    fallback_factor: float = field(default=0.01, metadata=_check(_unit_interval))
    fallback_batches: int = field(default=10, metadata=_check(_non_negative))


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    epochs: int = field(default=10, metadata=_check(_positive))
    seed: int = field(default=0, metadata=_check(_non_negative))
    lr: float = field(default=1e-3, metadata=_check(_positive))
    weight_decay: float = field(default=0.01, metadata=_check(_non_negative))
    grad_clip: float = field(default=0.5, metadata=_check(_positive))  # the notebook's 0.5 (docs/design.md)
    device: str = field(default="auto", metadata=_check(_device))
    max_steps_per_epoch: int = field(default=0, metadata=_check(_non_negative))  # 0 = the whole split
    max_eval_batches: int = field(default=0, metadata=_check(_non_negative))  # 0 = the whole split
    # Training tokens the closed-form linear replacement of every block is fitted on at each evaluation
    # (trainer/linearity.py; fixed windows spread over the train split); 0 = the measure is off.
    linear_fit_tokens: int = field(default=4096, metadata=_check(_non_negative))
    progress: bool = False  # a progress bar per epoch on stderr


@dataclass(frozen=True)
class TrainerConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    koopman: KoopmanConfig = field(default_factory=KoopmanConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.d_model % self.model.n_heads:
            raise ConfigError(
                f"model.d_model must be divisible by model.n_heads, but got d_model={self.model.d_model}, "
                f"n_heads={self.model.n_heads}"
            )

    def without_koopman(self) -> TrainerConfig:
        """The matched baseline: the same config with the Koopman loss off."""
        return replace(self, koopman=replace(self.koopman, enabled=False))


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "koopman": KoopmanConfig,
    "train": TrainConfig,
}


def _type_ok(expected: type, value: Any) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


def _build_section(cls: type, values: Mapping[str, Any], section: str, origin: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        where = f"({origin}, [{section}.{key}])" if origin else f"([{section}.{key}])"
        if key not in known:
            raise ConfigError(f"unknown key {section}.{key}={value!r}; known keys: {', '.join(known)} {where}")
        f = known[key]
        expected = _TYPES[f.type] if isinstance(f.type, str) else f.type
        if not _type_ok(expected, value):
            raise ConfigError(f"{key} must be {_TYPE_NAMES[expected]}, but got {key}={value!r} {where}")
        if expected is float:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be finite, but got {key}={value!r} {where}")
        check = f.metadata.get("check")
        problem = check(key, value) if check else None
        if problem:
            raise ConfigError(f"{problem}, but got {key}={value!r} {where}")
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(values: Mapping[str, Any], origin: str = "") -> TrainerConfig:
    """Build and validate a :class:`TrainerConfig` from ``{"data": {...}, "koopman": {...}, ...}``."""
    sections: dict[str, Any] = {}
    for section, body in values.items():
        if section not in SECTIONS:
            where = f" ({origin})" if origin else ""
            raise ConfigError(f"unknown section [{section}]; known sections: {', '.join(SECTIONS)}{where}")
        if not isinstance(body, Mapping):
            where = f" ({origin}, [{section}])" if origin else ""
            raise ConfigError(f"[{section}] must be a table, but got {section}={body!r}{where}")
        sections[section] = _build_section(SECTIONS[section], body, section, origin)
    try:
        return TrainerConfig(**sections)
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({origin})" if origin else str(exc)) from None


def config_to_dict(cfg: TrainerConfig) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`config_from_dict` (every key, defaults included)."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> TrainerConfig:
    """Read a trainer config TOML file (sections [data], [model], [koopman], [train])."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return config_from_dict(values, origin=str(path))


def with_overrides(cfg: TrainerConfig, overrides: Mapping[str, Any], origin: str = "") -> TrainerConfig:
    """Return ``cfg`` with dotted overrides applied, e.g. ``{"koopman.dim": 128}``, validated."""
    values = config_to_dict(cfg)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in values or not key:
            raise ConfigError(f"unknown config key {dotted}={value!r}" + (f" ({origin})" if origin else ""))
        values[section][key] = value
    return config_from_dict(values, origin=origin)
