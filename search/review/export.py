"""Exporting a trial as a trainer config file that ``koopman-search train --config`` runs as is."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optuna
import tomli_w

from koopman_search.search.errors import StorageError
from koopman_search.search.storage.layout import SPEC_DEFINITION_ATTR, WORKER, stored_definition
from koopman_search.search.storage.optuna_private import storage_of, study_id_of
from koopman_search.search.studyfile.spec import StudySpec, spec_from_dict
from koopman_search.search.text import number
from koopman_search.trainer.config import TrainerConfig, config_to_dict

__all__ = ["dump_toml", "stored_spec", "trial_config", "trial_config_toml"]


def dump_toml(sections: Mapping[str, Mapping[str, Any]], header: str = "") -> str:
    """``{"section": {"key": value}}`` as TOML (tomli-w), under ``header`` as comment lines. A non-finite
    float has no TOML spelling a trainer config accepts: it is refused with the key named."""
    for name, body in sections.items():
        for key, value in body.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"TOML cannot hold {value!r}, but got [{name}] {key} = {value!r}")
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    text = tomli_w.dumps({name: dict(body) for name, body in sections.items()})
    return ("\n".join(lines) + "\n\n" if lines else "") + text


def stored_spec(study: optuna.Study) -> StudySpec:
    """The study definition stored in the study by ``create``/``launch``."""
    system = storage_of(study).get_study_system_attrs(study_id_of(study))
    values = stored_definition(system, study.user_attrs)
    if values is None:
        raise StorageError(
            f"study {study.study_name} holds no koopman-search definition "
            f"(study system attr {SPEC_DEFINITION_ATTR!r}); was it created by koopman-search?"
        )
    values["study"] = {**values["study"], "name": study.study_name}
    return spec_from_dict(values, origin=f"study {study.study_name}")


def trial_config(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> TrainerConfig:
    return stored_spec(study).trial_config(trial.params)


def trial_config_toml(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    cfg = trial_config(study, trial)
    values = ", ".join(number(v) for v in trial.values) if trial.values else "none"
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    header = (
        f"koopman-search: trial {trial.number} of study {study.study_name} ({trial.state.name})\n"
        f"{', '.join(names)} = {values}\n"
        f"run it: koopman-search train --config THIS_FILE.toml"
    )
    worker = trial.user_attrs.get(WORKER)
    threads = worker.get("torch_threads") if isinstance(worker, Mapping) else None
    if isinstance(threads, int) and not isinstance(threads, bool):
        # CPU results depend on the thread count (another reduction order): name the trial's
        header += f"\ntrained with {threads} torch thread(s); on CPU, OMP_NUM_THREADS={threads} reproduces it exactly"
    return dump_toml(config_to_dict(cfg), header)
