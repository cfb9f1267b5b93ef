"""The search space: suggestions, their mapping into trainer configs, and membership."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from koopman_search.search.errors import SpecError
from koopman_search.search.studyfile.space import (
    OPTIONAL_PARAMS,
    PARAM_NAMES,
    PARAM_TO_PATH,
    CategoricalParam,
    FixedParam,
    FloatParam,
    IntParam,
    SearchSpace,
)
from koopman_search.trainer.config import TrainerConfig, config_from_dict
from koopman_search.trainer.errors import ConfigError

BASE = config_from_dict({"train": {"epochs": 10}, "koopman": {"dim": 64}})
TABLES = {
    "koopman_weight_max": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
    "koopman_start_epoch": {"type": "int", "low": 2, "high": 7},
    "fallback_threshold": {"type": "float", "low": 4.0, "high": 12.0},
    "schedule": {"type": "categorical", "choices": ["linear", "exponential", "step", "cosine"]},
    "koopman_dim": {"type": "categorical", "choices": [128, 256]},
}
PARAMS = {
    "koopman_weight_max": 0.05,
    "koopman_start_epoch": 4,
    "fallback_threshold": 8.0,
    "schedule": "linear",
    "koopman_dim": 256,
}


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace.from_dict(TABLES, BASE, origin="test.toml")


def test_param_names_map_to_existing_trainer_config_fields() -> None:
    assert dict(PARAM_TO_PATH) == {
        "koopman_weight_max": "koopman.weight_max",
        "koopman_start_epoch": "koopman.start_epoch",
        "fallback_threshold": "koopman.fallback_threshold",
        "schedule": "koopman.schedule",
        "koopman_dim": "koopman.dim",
        "koopman_loss": "koopman.loss",
        "koopman_fit": "koopman.fit",
    }
    for path in PARAM_TO_PATH.values():
        section, _, key = path.partition(".")
        assert key in {f.name for f in dataclasses.fields(getattr(TrainerConfig(), section))}


def test_suggest_with_a_fixed_trial_returns_the_declared_types(space: SearchSpace) -> None:
    params = space.suggest(optuna.trial.FixedTrial(PARAMS))
    assert params == PARAMS
    assert type(params["koopman_dim"]) is int
    assert type(params["koopman_start_epoch"]) is int
    assert type(params["koopman_weight_max"]) is float
    assert type(params["fallback_threshold"]) is float
    assert type(params["schedule"]) is str


def test_suggest_samples_inside_the_ranges_with_a_real_study(space: SearchSpace) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        params = space.suggest(trial)
        assert space.contains(params)
        assert trial.params == params
        assert type(params["koopman_dim"]) is int and params["koopman_dim"] in (128, 256)
        study.tell(trial, 0.0)


def test_fixed_parameters_are_recorded_on_the_trial() -> None:
    space = SearchSpace.from_dict({"koopman_dim": {"type": "fixed", "value": 128}}, BASE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = space.suggest(trial)
    assert set(trial.params) == set(PARAM_NAMES) - OPTIONAL_PARAMS
    assert params["koopman_dim"] == 128
    # left-out parameters are fixed at the base config's value
    assert params["koopman_weight_max"] == BASE.koopman.weight_max
    assert params["schedule"] == BASE.koopman.schedule


def test_left_out_parameters_are_fixed_at_the_base_value() -> None:
    space = SearchSpace.from_dict({}, BASE)
    assert space.searched == ()
    assert space.params["koopman_dim"] == FixedParam("koopman_dim", 64)


def test_to_config_writes_each_parameter_into_its_field(space: SearchSpace) -> None:
    params = {
        "koopman_weight_max": 0.1,
        "koopman_start_epoch": 5,
        "fallback_threshold": 7.0,
        "schedule": "exponential",
        "koopman_dim": 128,
    }
    cfg = space.to_config(BASE, params)
    assert (cfg.koopman.weight_max, cfg.koopman.start_epoch, cfg.koopman.fallback_threshold) == (0.1, 5, 7.0)
    assert (cfg.koopman.schedule, cfg.koopman.dim) == ("exponential", 128)
    assert cfg.train == BASE.train and cfg.model == BASE.model and cfg.data == BASE.data


def test_to_config_fills_in_fixed_parameters() -> None:
    space = SearchSpace.from_dict({"koopman_dim": {"type": "fixed", "value": 32}}, BASE)
    assert space.to_config(BASE, {}).koopman.dim == 32


def test_to_config_requires_every_searched_parameter(space: SearchSpace) -> None:
    params = {k: v for k, v in PARAMS.items() if k != "schedule"}
    with pytest.raises(ConfigError, match="schedule must be given: it is searched"):
        space.to_config(BASE, params)


def test_to_config_rejects_unknown_parameters(space: SearchSpace) -> None:
    with pytest.raises(ConfigError, match=r"unknown search parameter lr=0\.1"):
        space.to_config(BASE, {**PARAMS, "lr": 0.1})


def test_to_config_is_validated_by_the_trainer_config(space: SearchSpace) -> None:
    with pytest.raises(ConfigError, match="dim must be > 0, but got dim=0"):
        space.to_config(BASE, {**PARAMS, "koopman_dim": 0})


def test_contains_accepts_values_inside_and_rejects_values_outside(space: SearchSpace) -> None:
    assert space.contains(PARAMS)
    assert space.contains({**PARAMS, "koopman_weight_max": 0.01, "koopman_start_epoch": 7})  # the bounds
    assert not space.contains({**PARAMS, "koopman_weight_max": 0.0099})
    assert not space.contains({**PARAMS, "koopman_start_epoch": 8})
    assert not space.contains({**PARAMS, "koopman_start_epoch": 4.0})  # a float for an int
    assert not space.contains({**PARAMS, "koopman_dim": 512})
    assert not space.contains({**PARAMS, "schedule": "cosin"})
    assert not space.contains({k: v for k, v in PARAMS.items() if k != "koopman_dim"})


def test_validate_turns_ints_into_floats_and_names_the_key(space: SearchSpace) -> None:
    assert space.validate({**PARAMS, "fallback_threshold": 8})["fallback_threshold"] == 8.0
    with pytest.raises(
        SpecError,
        match=r"koopman_dim must be one of \[128, 256\], but got koopman_dim=64 "
        r"\(x.toml, \[enqueue.1.koopman_dim\]\)",
    ):
        space.validate({**PARAMS, "koopman_dim": 64}, "x.toml", "enqueue.1")


def test_float_param_needs_low_below_high() -> None:
    FloatParam("fallback_threshold", 4.0, 4.0001)
    with pytest.raises(ConfigError, match=r"low must be < high, but got low=4\.0, high=4\.0"):
        FloatParam("fallback_threshold", 4.0, 4.0)


def test_int_param_allows_a_single_value_but_not_an_inverted_range() -> None:
    assert IntParam("koopman_start_epoch", 3, 3).contains(3)
    with pytest.raises(ConfigError, match="low must be <= high, but got low=4, high=3"):
        IntParam("koopman_start_epoch", 4, 3)


def test_stepped_params_contain_only_grid_points() -> None:
    ints = IntParam("koopman_dim", 64, 256, step=64)
    assert ints.contains(192) and not ints.contains(100)
    floats = FloatParam("fallback_threshold", 4.0, 12.0, step=0.5)
    assert floats.contains(7.5) and not floats.contains(7.3)
    with pytest.raises(ConfigError, match="high - low must be a multiple of step"):
        IntParam("koopman_dim", 64, 250, step=64)


def test_categorical_param_rejects_duplicates_and_booleans() -> None:
    with pytest.raises(ConfigError, match=r"choices must be unique, but got choices=\[16, 16\]"):
        CategoricalParam("koopman_dim", (16, 16))
    assert not CategoricalParam("koopman_dim", (1, 2)).contains(True)


def test_space_round_trips_through_to_dict(space: SearchSpace) -> None:
    assert SearchSpace.from_dict(space.to_dict(), BASE) == space


def test_the_objective_and_the_fit_of_k_can_be_searched_beside_the_five() -> None:
    tables = {
        "koopman_loss": {"type": "categorical", "choices": ["decoder", "smooth_l1"]},
        "koopman_fit": {"type": "categorical", "choices": ["gradient", "dmd"]},
    }
    space = SearchSpace.from_dict(tables, BASE)
    assert set(space.searched) == {"koopman_loss", "koopman_fit"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = space.suggest(trial)
    assert set(trial.params) == (set(PARAM_NAMES) - OPTIONAL_PARAMS) | {"koopman_loss", "koopman_fit"}
    cfg = space.to_config(BASE, params)
    assert (cfg.koopman.loss, cfg.koopman.fit) == (params["koopman_loss"], params["koopman_fit"])


def test_a_searched_objective_outside_the_trainers_choices_names_the_value() -> None:
    with pytest.raises(SpecError, match="koopman_loss must be one of decoder, smooth_l1, mse"):
        SearchSpace.from_dict(
            {"koopman_loss": {"type": "categorical", "choices": ["decoder", "l1"]}}, BASE, origin="x.toml"
        )
