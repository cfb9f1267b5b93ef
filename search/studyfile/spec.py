"""Study files: TOML in, a validated, frozen :class:`StudySpec` out.

Everything is checked at load time and nothing touches a storage while loading. Each problem raises one
:class:`SpecError` line naming the file, the key and the value, e.g.

    low must be < high, but got low=0.2, high=0.1 (studies/x.toml, [search.koopman_weight_max])

The file's shape (see ``studies/quickstart.toml`` for a commented example)::

    [study]
    name = "wikitext2-koopman"        # letters, digits, . _ -; also names the default SQLite file
    storage = ""                      # "" = sqlite:///<study file dir>/<name>.db; ${VAR} expands from the env
    artifacts = ""                    # "" = <study file dir>/<name>-artifacts; a path, or s3://bucket/prefix
    n_trials = 30                     # 1..100000 and >= the number of [[enqueue]] trials
    sampler = "tpe"                   # tpe | tpe-rungs (with asha) | random | nsgaii
    seed = 0                          # the sampler's seed, 0..2**31-1
    pruner = "none"                   # none | asha | median | hyperband (median, hyperband: one objective only)
    asha_reduction_factor = 3         # asha's η: a rung keeps the top 1/η (integer >= 2)
    asha_min_epochs = 1               # asha's first rung, in Koopman epochs (< trainer.train.epochs)
    asha_min_trials = 1               # asha prunes at a rung once this many trials have a record there
    shared_warmup = true              # trials start from the baseline's checkpoint at their start epoch
    objectives = [{ metric = "val_ppl", direction = "minimize" },
                  { metric = "val_linear_nre", direction = "minimize" }]    # the default

    [trainer.data] / [trainer.model] / [trainer.koopman] / [trainer.train]   # trainer.config sections
    [search.<param>]                  # type = "float" | "int" | "categorical" | "fixed"; see search.studyfile.space
    [rules]                           # total_loss_max = 7.0, val_ppl_ratio_max = 1.3 (the defaults)
    [baseline]                        # val_ppl = "auto" | a number | a list with one number per epoch
    [[enqueue]]                       # label = "...", then a value for every searched parameter

Paths in a study file are relative to the file's own directory: a relative SQLite path, ``artifacts``,
``trainer.data.source = "files:DIR"`` and ``trainer.data.cache_dir``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from koopman_search.search.errors import SpecError
from koopman_search.search.studyfile.prune_settings import ASHA_KEYS, DEFAULT_FINITE_METRICS, AshaSettings, RuleSettings
from koopman_search.search.studyfile.space import PARAM_NAMES, CategoricalParam, FixedParam, SearchSpace
from koopman_search.search.studyfile.urls import expand_env, resolve_artifacts, resolve_path, resolve_storage_url
from koopman_search.trainer.config import SECTIONS, TrainerConfig, config_from_dict, config_to_dict, with_overrides
from koopman_search.trainer.errors import ConfigError
from koopman_search.trainer.records import RECORD_FIELDS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

if TYPE_CHECKING:
    import optuna

__all__ = [
    "DIRECTIONS",
    "OBJECTIVE_METRICS",
    "PRUNERS",
    "SAMPLERS",
    "BaselineSetting",
    "EnqueuedTrial",
    "Objective",
    "StudySpec",
    "load_spec",
    "spec_from_dict",
]

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "tpe-rungs", "random", "nsgaii")
PRUNERS = ("none", "asha", "median", "hyperband")
DIRECTIONS = ("minimize", "maximize")
OBJECTIVE_METRICS = tuple(f for f in RECORD_FIELDS if f not in ("epoch", "epochs"))
DEFAULT_OBJECTIVES = (("val_ppl", "minimize"), ("val_linear_nre", "minimize"))
# Objectives that exist only for a Koopman objective with a decoder ψ (NaN otherwise: docs/koopman-objective.md)
DECODER_METRICS = frozenset({"val_koopman_forward_ppl"})
# Objectives of the closed-form linear replacement (trainer/linearity.py): NaN when it is off
LINEAR_METRICS = frozenset({"val_linear_nre", "val_linear_ppl", "val_linear_ppl_ratio"})

TABLES = ("study", "trainer", "search", "rules", "baseline", "enqueue")
STUDY_KEYS = (
    "name",
    "storage",
    "artifacts",
    "n_trials",
    "sampler",
    "seed",
    "pruner",
    "shared_warmup",
    "objectives",
    *ASHA_KEYS,
)
RULE_KEYS = ("total_loss_max", "val_ppl_ratio_max", "phi_rank_min", "koopman_gain_min")
BASELINE_KEYS = ("val_ppl",)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ---- the spec ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    metric: str  # an EpochRecord field, taken from the trial's last epoch
    direction: str  # "minimize" | "maximize"

    def to_dict(self) -> dict[str, str]:
        return {"metric": self.metric, "direction": self.direction}


@dataclass(frozen=True)
class BaselineSetting:
    """``mode="auto"``: run the Koopman-off baseline (values None). ``mode="fixed"``: per-epoch val
    perplexities given in the study file (``values[e - 1]`` is epoch e)."""

    mode: str
    values: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"val_ppl": "auto" if self.values is None else list(self.values)}


@dataclass(frozen=True)
class EnqueuedTrial:
    """A trial to run before any sampled one: a value for each of the five parameters."""

    label: str | None
    params: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return ({"label": self.label} if self.label is not None else {}) | dict(self.params)


@dataclass(frozen=True)
class StudySpec:
    path: Path | None  # the study file, None when built from a mapping
    name: str
    storage_url: str  # may hold a password: show it only through redact_url()
    artifacts_dir: str  # an absolute directory, or an s3://bucket/prefix URL
    n_trials: int
    sampler: str
    sampler_seed: int
    pruner: str
    shared_warmup: bool
    objectives: tuple[Objective, ...]
    trainer: TrainerConfig  # the base config every trial starts from
    space: SearchSpace
    rules: RuleSettings
    baseline: BaselineSetting
    enqueue: tuple[EnqueuedTrial, ...] = field(default=())
    asha: AshaSettings | None = None  # pruner = "asha" only

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def epochs(self) -> int:
        return self.trainer.train.epochs

    @property
    def baseline_config(self) -> TrainerConfig:
        """The matched baseline: the base config with the Koopman loss off (same seed, same epochs)."""
        return self.trainer.without_koopman()

    def with_device(self, device: str | None, origin: str = "--device") -> StudySpec:
        """The study with every run's trainer device set to ``device`` (validated like any config value);
        unchanged for None. Applied once, where the device is chosen: every run reads it from here."""
        if device is None:
            return self
        return replace(self, trainer=with_overrides(self.trainer, {"train.device": device}, origin=origin))

    def trial_config(self, params: Mapping[str, Any]) -> TrainerConfig:
        """The trainer config of one trial: the base config with the trial's parameters written in."""
        return self.space.to_config(self.trainer, params, origin=self.name)

    def to_dict(self) -> dict[str, Any]:
        """The study as a plain JSON-able mapping, storage URL left out (it is stored with the study).
        ``spec_from_dict`` reads it back."""
        return {
            "study": {
                "name": self.name,
                "artifacts": self.artifacts_dir,
                "n_trials": self.n_trials,
                "sampler": self.sampler,
                "seed": self.sampler_seed,
                "pruner": self.pruner,
                **(self.asha.to_dict() if self.asha is not None else {}),
                "shared_warmup": self.shared_warmup,
                "objectives": [o.to_dict() for o in self.objectives],
            },
            "trainer": config_to_dict(self.trainer),
            "search": self.space.to_dict(),
            "rules": self.rules.to_dict(),
            "baseline": self.baseline.to_dict(),
            "enqueue": [e.to_dict() for e in self.enqueue],
        }

    def make_sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        """A fresh sampler. Give each concurrent worker its own ``seed_offset``: samplers with equal seeds
        in several processes propose the same parameters."""
        import optuna

        seed = self.sampler_seed + seed_offset
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.sampler == "nsgaii":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if self.sampler == "tpe-rungs" and self.asha is not None:
            from koopman_search.search.pruning.rung_sampler import RungTPESampler
            from koopman_search.search.storage.layout import baseline_key

            return RungTPESampler(
                self.asha,
                self.metrics,
                self.directions,
                self.epochs,
                self.trainer.koopman.start_epoch,
                baseline_key(self.trainer.train.seed),
                len(self.space.searched) + 2,
                seed=seed,
            )
        return optuna.samplers.TPESampler(seed=seed)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        """Optuna's pruner for single-objective studies; ``NopPruner`` for "none" and for "asha", which the
        search applies itself (search/pruning/asha.py; ``create_study`` would otherwise default to a median pruner).
        The prune rules apply either way."""
        import optuna

        if self.pruner == "median":
            return optuna.pruners.MedianPruner()
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=self.epochs)
        return optuna.pruners.NopPruner()


# ---- loading -----------------------------------------------------------------------------------------------


MAX_STUDY_FILE_BYTES = 1 << 20
MAX_TRIALS = 100_000  # a budget is a queue of WAITING trials in the database: each is a row
# A study name's longest form: Optuna keeps names in VARCHAR(512); the baseline's companion study and its
# attrs add suffixes, so the name itself stays far below that.
MAX_NAME_LENGTH = 128
DATA_SOURCE_ENV = "KOOPMAN_DATA_SOURCE"  # replaces trainer.data.source of every study file (README, "Data")
MAX_SEED = 2**31  # the sampler's seed plus a worker's offset (< 2**30) must stay below numpy's 2**32


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file. Raises :class:`SpecError`; never touches a storage."""
    path = Path(path)
    origin = str(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(origin)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
            raise SpecError(f"study file must be a regular file, but got a special file: {origin}")
        if info.st_size > MAX_STUDY_FILE_BYTES:
            raise SpecError(
                f"study file must be at most {MAX_STUDY_FILE_BYTES} bytes, but got {info.st_size} bytes: {origin}"
            )
        with path.open("rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError:
        raise SpecError(f"study file not found: {origin} (looked in {Path.cwd()}); check the path") from None
    except IsADirectoryError:
        raise SpecError(f"study file must be a TOML file, but got a directory: {origin}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"study file must be UTF-8 text, but got {exc.reason} ({origin})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"study file is not valid TOML: {exc}; fix the syntax there ({origin})") from None
    except RecursionError:
        raise SpecError(f"study file nests its tables or arrays too deeply to read: {origin}") from None
    except OSError as exc:  # unreadable, a symlink loop, an I/O error
        raise SpecError(f"study file cannot be read: {exc.strerror or exc} ({origin})") from None
    return spec_from_dict(values, origin=origin, base_dir=path.resolve().parent)


def spec_from_dict(values: Mapping[str, Any], origin: str = "", base_dir: str | Path = ".") -> StudySpec:
    """Validate a study given as a mapping (a parsed TOML file, or :meth:`StudySpec.to_dict`).

    ``origin`` names the source in messages; relative paths resolve against ``base_dir``."""
    base = Path(base_dir).resolve()
    _known_keys(values, TABLES, origin, "", what="table")
    for table in TABLES[:-1]:
        _table(values, table, origin)

    study = values.get("study", {})
    _known_keys(study, STUDY_KEYS, origin, "study")
    name = _name(study, origin)
    n_trials = _get(study, "n_trials", int, origin, "study", default=30)
    if n_trials < 1:
        raise SpecError.at(f"n_trials must be >= 1, but got n_trials={n_trials}", origin, "study.n_trials")
    if n_trials > MAX_TRIALS:
        raise SpecError.at(f"n_trials must be <= {MAX_TRIALS}, but got n_trials={n_trials}", origin, "study.n_trials")
    sampler = _choice(study, "sampler", SAMPLERS, origin, "study")
    seed = _get(study, "seed", int, origin, "study", default=0)
    if not 0 <= seed < MAX_SEED:
        raise SpecError.at(f"seed must be in 0..{MAX_SEED - 1}, but got seed={seed}", origin, "study.seed")
    pruner = _choice(study, "pruner", PRUNERS, origin, "study")
    shared_warmup = _get(study, "shared_warmup", bool, origin, "study", default=True)

    trainer = _trainer(values.get("trainer", {}), origin, base)
    objectives = _objectives(study, trainer, origin)
    asha = _asha(study, pruner, sampler, objectives, trainer.train.epochs, origin)
    storage_url = resolve_storage_url(_get(study, "storage", str, origin, "study", default=""), name, origin, base)
    artifacts = resolve_artifacts(_get(study, "artifacts", str, origin, "study", default=""), name, origin, base)

    space = SearchSpace.from_dict(values.get("search", {}), trainer, origin)
    _check_decoder_objectives(objectives, trainer, space, origin)
    _check_linear_objectives(objectives, trainer, origin)
    rules = _rules(values.get("rules", {}), objectives, origin)
    baseline = _baseline(values.get("baseline", {}), trainer.train.epochs, origin)
    enqueue = _enqueue(values.get("enqueue", []), space, origin)
    if len(enqueue) > n_trials:
        raise SpecError.at(
            f"n_trials must be >= the number of [[enqueue]] trials, but got n_trials={n_trials} with "
            f"{len(enqueue)} enqueued",
            origin,
            "study.n_trials",
        )
    return StudySpec(
        path=Path(origin) if origin else None,
        name=name,
        storage_url=storage_url,
        artifacts_dir=artifacts,
        n_trials=n_trials,
        sampler=sampler,
        sampler_seed=seed,
        pruner=pruner,
        shared_warmup=shared_warmup,
        objectives=objectives,
        trainer=trainer,
        space=space,
        rules=rules,
        baseline=baseline,
        enqueue=enqueue,
        asha=asha,
    )


# ---- sections ----------------------------------------------------------------------------------------------


def _name(study: Mapping[str, Any], origin: str) -> str:
    name = _get(study, "name", str, origin, "study", required=True)
    if len(name) > MAX_NAME_LENGTH:
        raise SpecError.at(
            f"name must be at most {MAX_NAME_LENGTH} characters (the database keeps it with the baseline's and "
            f"the companion study's suffixes), but got a name of {len(name)} characters: {name[:40]!r}...",
            origin,
            "study.name",
        )
    if not NAME_PATTERN.fullmatch(name):
        raise SpecError.at(
            f"name must start with a letter or digit and use only letters, digits, '.', '_' and '-', "
            f"but got name={name!r}",
            origin,
            "study.name",
        )
    return str(name)


def _asha(
    study: Mapping[str, Any],
    pruner: str,
    sampler: str,
    objectives: tuple[Objective, ...],
    epochs: int,
    origin: str,
) -> AshaSettings | None:
    """The asha settings (None unless pruner = "asha"); Optuna's one-objective pruners refuse several."""
    asha = AshaSettings.from_study(study, pruner, epochs, origin)
    if asha is None and sampler == "tpe-rungs":
        raise SpecError.at(
            f'sampler "tpe-rungs" learns from asha\'s rungs, but got sampler="tpe-rungs" with pruner={pruner!r}; '
            'set pruner = "asha", or sampler = "tpe"',
            origin,
            "study.sampler",
        )
    if asha is not None and sampler == "nsgaii":
        logger.warning(
            "%s: NSGA-II learns from complete trials only, so the trials asha prunes do not inform it and its "
            'generations fill slowly (docs/asha.md); sampler = "tpe" learns from them',
            origin,
        )
    if pruner in ("median", "hyperband") and len(objectives) > 1:
        raise SpecError.at(
            f"pruner works only with one objective, but got pruner={pruner!r} with {len(objectives)} "
            'objectives; set pruner = "asha" (successive halving on several objectives) or "none" (the prune '
            "rules still apply), or keep one objective",
            origin,
            "study.pruner",
        )
    return asha


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _table(values: Mapping[str, Any], key: str, origin: str) -> None:
    if key in values and not isinstance(values[key], Mapping):
        raise SpecError.at(f"[{key}] must be a table, but got {key}={_show(values[key])}", origin, key)


def _known_keys(table: Mapping[str, Any], known: tuple[str, ...], origin: str, prefix: str, what: str = "key") -> None:
    for key, value in table.items():
        if key not in known:
            dotted = f"{prefix}.{key}" if prefix else key
            shown = f"[{key}]" if what == "table" else f"{key}={_show(value)}"
            raise SpecError.at(f"unknown {what} {shown}; known {what}s: {', '.join(known)}", origin, dotted)


def _get(
    table: Mapping[str, Any],
    key: str,
    kind: type,
    origin: str,
    prefix: str,
    default: Any = None,
    required: bool = False,
) -> Any:
    dotted = f"{prefix}.{key}"
    if key not in table:
        if required:
            raise SpecError.at(f"{key} is required in [{prefix}]; add {key} = ...", origin, dotted)
        return default
    value = table[key]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise SpecError.at(f"{key} must be {_TYPE_NAMES[kind]}, but got {key}={_show(value)}", origin, dotted)
    return float(value) if kind is float else value


def _choice(table: Mapping[str, Any], key: str, choices: tuple[str, ...], origin: str, prefix: str) -> str:
    value = _get(table, key, str, origin, prefix, default=choices[0])
    if value not in choices:
        raise SpecError.at(
            f"{key} must be one of {', '.join(choices)}, but got {key}={value!r}", origin, f"{prefix}.{key}"
        )
    return value


def _trainer(sections: Mapping[str, Any], origin: str, base_dir: Path) -> TrainerConfig:
    _known_keys(sections, tuple(SECTIONS), origin, "trainer", what="table")
    for section, body in sections.items():
        if not isinstance(body, Mapping):
            key = f"trainer.{section}"
            raise SpecError.at(f"[{key}] must be a table, but got {section}={_show(body)}", origin, key)
    resolved = {section: dict(body) for section, body in sections.items()}
    data = resolved.setdefault("data", {})
    override = os.environ.get(DATA_SOURCE_ENV, "").strip()
    if override:  # a local copy in place of the file's source (tests, benchmarks, a machine with no network)
        if override.startswith("files:"):  # relative to where the command runs, not to the study file
            override = f"files:{os.path.abspath(Path(override.removeprefix('files:')).expanduser())}"
        logger.debug("trainer.data.source=%s (from $%s)", override, DATA_SOURCE_ENV)
        data["source"] = override
    source = data.get("source")
    if isinstance(source, str) and source.startswith("files:"):
        relative = expand_env(source.removeprefix("files:"), origin, "trainer.data.source")
        directory = resolve_path(base_dir, relative)
        data["source"] = f"files:{directory}"
        if not Path(directory).is_dir():  # workers may mount it elsewhere; the trainer says so if it is missing
            logger.warning("%s: data directory %s does not exist on this machine", origin, directory)
    cache_dir = data.get("cache_dir")
    if isinstance(cache_dir, str) and cache_dir:
        relative = expand_env(cache_dir, origin, "trainer.data.cache_dir")
        data["cache_dir"] = resolve_path(base_dir, relative)
    try:
        cfg = config_from_dict(resolved, origin=origin)
    except ConfigError as exc:
        # the trainer names keys [section.key]; in a study file they live under [trainer.section.key]
        message = str(exc).replace(f"({origin}, [", f"({origin}, [trainer.")
        if override and "[trainer.data.source]" in message:
            message += f", set by ${DATA_SOURCE_ENV}"
        raise SpecError(message) from None
    if not cfg.koopman.enabled:
        raise SpecError.at(
            "koopman.enabled must be true in a study (the baseline turns it off by itself), but got enabled=false",
            origin,
            "trainer.koopman.enabled",
        )
    return cfg


def _objectives(study: Mapping[str, Any], trainer: TrainerConfig, origin: str) -> tuple[Objective, ...]:
    key = "study.objectives"
    if "objectives" not in study:
        return tuple(Objective(m, d) for m, d in DEFAULT_OBJECTIVES)
    listed = study["objectives"]
    if not isinstance(listed, list) or not listed:
        raise SpecError.at(
            'objectives must be a non-empty list like [{ metric = "val_ppl", direction = "minimize" }], '
            f"but got objectives={_show(listed)}",
            origin,
            key,
        )
    objectives: list[Objective] = []
    for i, item in enumerate(listed, start=1):
        where = f"{key}.{i}"
        if not isinstance(item, Mapping):
            raise SpecError.at(
                f'each objective must be a table like {{ metric = "val_ppl", direction = "minimize" }}, '
                f"but got {_show(item)}",
                origin,
                where,
            )
        _known_keys(item, ("metric", "direction"), origin, where)
        metric = _get(item, "metric", str, origin, where, required=True)
        if metric not in OBJECTIVE_METRICS:
            known = ", ".join(OBJECTIVE_METRICS)
            raise SpecError.at(
                f"metric must be an epoch record field ({known}), but got metric={metric!r}",
                origin,
                f"{where}.metric",
            )
        if metric in (o.metric for o in objectives):
            raise SpecError.at(f"metric must be listed once, but got metric={metric!r} twice", origin, where)
        direction = _get(item, "direction", str, origin, where, default="minimize")
        if direction not in DIRECTIONS:
            raise SpecError.at(
                f"direction must be one of {', '.join(DIRECTIONS)}, but got direction={direction!r}",
                origin,
                f"{where}.direction",
            )
        objectives.append(Objective(metric, direction))
    return tuple(objectives)


def _check_decoder_objectives(
    objectives: tuple[Objective, ...], trainer: TrainerConfig, space: SearchSpace, origin: str
) -> None:
    """A Koopman-forward objective needs a decoder in every trial: every loss the study can run must be
    ``decoder``, or every trial without one would be pruned for a NaN objective."""
    needs = [o.metric for o in objectives if o.metric in DECODER_METRICS]
    if not needs:
        return
    param = space.params.get("koopman_loss")
    losses = (
        param.choices
        if isinstance(param, CategoricalParam)
        else ((param.value,) if isinstance(param, FixedParam) else (trainer.koopman.loss,))
    )
    other = [loss for loss in losses if loss != "decoder"]
    if other:
        where = "search.koopman_loss" if param is not None else "trainer.koopman.loss"
        raise SpecError.at(
            f'objective {needs[0]} needs koopman.loss = "decoder" (the other forms have no decoder ψ), but '
            f"got loss={other[0]!r}; use val_koopman_nre or val_koopman_gain as the objective instead",
            origin,
            where,
        )


def _check_linear_objectives(objectives: tuple[Objective, ...], trainer: TrainerConfig, origin: str) -> None:
    """A linear-replacement objective needs the measure on: ``train.linear_fit_tokens`` > 0."""
    needs = [o.metric for o in objectives if o.metric in LINEAR_METRICS]
    if needs and trainer.train.linear_fit_tokens == 0:
        raise SpecError.at(
            f"objective {needs[0]} needs the linear replacement measured (train.linear_fit_tokens > 0), but got "
            "linear_fit_tokens=0; set it (default 4096) or choose another objective",
            origin,
            "trainer.train.linear_fit_tokens",
        )


def _positive(table: Mapping[str, Any], key: str, default: float, origin: str, prefix: str) -> float:
    value: float = _get(table, key, float, origin, prefix, default=default)
    if not (math.isfinite(value) and value > 0):
        problem = f"{key} must be a finite number > 0, but got {key}={value!r}"
        raise SpecError.at(problem, origin, f"{prefix}.{key}")
    return value


def _rules(table: Mapping[str, Any], objectives: tuple[Objective, ...], origin: str) -> RuleSettings:
    _known_keys(table, RULE_KEYS, origin, "rules")
    defaults = RuleSettings()
    finite = tuple(dict.fromkeys((*DEFAULT_FINITE_METRICS, *(o.metric for o in objectives))))
    return RuleSettings(
        total_loss_max=_positive(table, "total_loss_max", defaults.total_loss_max, origin, "rules"),
        val_ppl_ratio_max=_positive(table, "val_ppl_ratio_max", defaults.val_ppl_ratio_max, origin, "rules"),
        finite_metrics=finite,
        phi_rank_min=_non_negative(table, "phi_rank_min", origin, "rules"),
        koopman_gain_min=_non_negative(table, "koopman_gain_min", origin, "rules"),
    )


def _non_negative(table: Mapping[str, Any], key: str, origin: str, prefix: str) -> float:
    value: float = _get(table, key, float, origin, prefix, default=0.0)
    if not (math.isfinite(value) and value >= 0):
        raise SpecError.at(
            f"{key} must be a finite number >= 0 (0 = off), but got {key}={value!r}", origin, f"{prefix}.{key}"
        )
    return value


def _baseline(table: Mapping[str, Any], epochs: int, origin: str) -> BaselineSetting:
    _known_keys(table, BASELINE_KEYS, origin, "baseline")
    key = "baseline.val_ppl"
    value = table.get("val_ppl", "auto")
    if value == "auto":
        return BaselineSetting("auto")
    hint = f'val_ppl must be "auto", a number, or a list of {epochs} numbers (one per epoch)'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        logger.warning(
            "%s: baseline val_ppl=%r is used for every epoch; early epochs are then held to a late-epoch "
            "value. A per-epoch list from an earlier run is safer.",
            origin,
            value,
        )
        value = [value] * epochs
    elif not isinstance(value, list):
        raise SpecError.at(f"{hint}, but got val_ppl={_show(value)}", origin, key)
    if len(value) != epochs:
        raise SpecError.at(f"{hint}, but got a list of {len(value)} for trainer.train.epochs={epochs}", origin, key)
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise SpecError.at(f"val_ppl values must be finite numbers > 0, but got {_show(v)}", origin, key)
    return BaselineSetting("fixed", tuple(float(v) for v in value))


def _enqueue(listed: Any, space: SearchSpace, origin: str) -> tuple[EnqueuedTrial, ...]:
    if not isinstance(listed, list):
        problem = f"enqueue must be a list of tables ([[enqueue]]), but got enqueue={_show(listed)}"
        raise SpecError.at(problem, origin, "enqueue")
    trials: list[EnqueuedTrial] = []
    for i, item in enumerate(listed, start=1):
        where = f"enqueue.{i}"
        if not isinstance(item, Mapping):
            problem = f"each [[enqueue]] entry must be a table, but got {_show(item)}"
            raise SpecError.at(problem, origin, where)
        _known_keys(item, ("label", *PARAM_NAMES), origin, where)
        label = _get(item, "label", str, origin, where)
        params = space.validate({k: v for k, v in item.items() if k != "label"}, origin, where)
        for j, other in enumerate(trials, start=1):
            if label is not None and other.label == label:
                problem = f"label must be unique, but got label={label!r} in entries {j} and {i}"
                raise SpecError.at(problem, origin, f"{where}.label")
            if other.params == params:
                problem = f"each enqueued trial must differ, but entry {i} repeats entry {j}: {params}"
                raise SpecError.at(problem, origin, where)
        trials.append(EnqueuedTrial(label, params))
    return tuple(trials)
