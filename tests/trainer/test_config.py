"""Trainer configuration: defaults, round trips and validation messages (trainer/config.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from koopman_search.trainer.config import (
    TrainerConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    with_overrides,
)
from koopman_search.trainer.errors import ConfigError

_FACTORY_RULE = r'factory must look like "package\.module:function" \(or be empty for the built-in model\)'
_FLOAT_KEYS = {"fallback_threshold", "fallback_factor", "weight_max", "ridge", "dropout", "lr", "grad_clip"}


def test_defaults_follow_the_users_setup() -> None:
    cfg = TrainerConfig()
    assert (cfg.data.vocab_size, cfg.data.seq_len, cfg.data.batch_size) == (30000, 128, 32)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.dropout) == (64, 4, 0.1)
    assert (cfg.train.lr, cfg.train.grad_clip, cfg.train.epochs) == (1e-3, 0.5, 10)
    # the loss is the well-posed decoder form, not the notebook's smooth-L1 (docs/koopman-objective.md)
    assert (cfg.koopman.dim, cfg.koopman.loss, cfg.koopman.fallback_factor) == (256, "decoder", 0.01)
    assert cfg.koopman.fallback_batches == 10


def test_config_round_trips_through_a_plain_dict() -> None:
    cfg = with_overrides(TrainerConfig(), {"koopman.dim": 128, "koopman.schedule": "cosine", "train.seed": 3})
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_missing_sections_and_keys_take_their_defaults() -> None:
    cfg = config_from_dict({"koopman": {"dim": 32}})
    assert cfg.koopman.dim == 32
    assert cfg.koopman.weight_max == TrainerConfig().koopman.weight_max
    assert cfg.train == TrainerConfig().train


def test_integers_are_accepted_where_a_number_is_expected() -> None:
    cfg = config_from_dict({"koopman": {"fallback_threshold": 7}})
    assert cfg.koopman.fallback_threshold == 7.0
    assert isinstance(cfg.koopman.fallback_threshold, float)


def test_without_koopman_changes_only_the_enabled_flag() -> None:
    cfg = with_overrides(TrainerConfig(), {"koopman.dim": 128, "koopman.start_epoch": 4})
    base = cfg.without_koopman()
    assert base.koopman.enabled is False
    assert config_to_dict(base)["koopman"] | {"enabled": True} == config_to_dict(cfg)["koopman"]
    assert (base.data, base.model, base.train) == (cfg.data, cfg.model, cfg.train)


def test_unknown_section_names_section_and_origin() -> None:
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\].*known sections: data.*\(run\.toml\)"):
        config_from_dict({"optimizer": {"lr": 1e-3}}, origin="run.toml")


def test_unknown_key_names_key_value_and_origin() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"koopman": {"dimension": 128}}, origin="run.toml")
    message = str(info.value)
    assert "koopman.dimension=128" in message
    assert "(run.toml, [koopman.dimension])" in message
    assert "known keys: enabled, dim" in message


def test_section_that_is_not_a_table_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"\[train\] must be a table, but got train=3 \(run\.toml, \[train\]\)"):
        config_from_dict({"train": 3}, origin="run.toml")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "epochs", True, "an integer"),  # bool is not an int here, although Python says it is
        ("train", "epochs", 3.0, "an integer"),
        ("koopman", "weight_max", "0.5", "a number"),
        ("koopman", "fallback_threshold", False, "a number"),
        ("koopman", "enabled", 1, "a boolean"),
        ("data", "source", 3, "a string"),
        ("model", "factory", None, "a string"),
    ],
)
def test_wrong_type_names_key_value_and_origin(section: str, key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({section: {key: value}}, origin="run.toml")
    assert str(info.value) == f"{key} must be {expected}, but got {key}={value!r} (run.toml, [{section}.{key}])"


@pytest.mark.parametrize(
    ("section", "key", "value", "rule"),
    [
        ("koopman", "fallback_threshold", -1, "fallback_threshold must be > 0"),
        ("koopman", "fallback_threshold", 0, "fallback_threshold must be > 0"),
        ("koopman", "fallback_factor", 1.5, r"fallback_factor must be in \[0, 1\]"),
        ("koopman", "fallback_factor", -0.01, r"fallback_factor must be in \[0, 1\]"),
        ("koopman", "fallback_batches", -1, "fallback_batches must be >= 0"),
        ("koopman", "weight_max", -0.5, "weight_max must be >= 0"),
        ("koopman", "start_epoch", -1, "start_epoch must be >= 0"),
        ("koopman", "dim", 0, "dim must be > 0"),
        ("koopman", "tokens_per_batch", -1, "tokens_per_batch must be >= 0"),
        ("koopman", "ridge", 0, "ridge must be > 0"),
        ("koopman", "schedule", "bogus", "schedule must be one of linear, exponential, step, cosine"),
        ("koopman", "fit", "pinv", "fit must be one of gradient, lstsq, dmd"),
        ("koopman", "loss", "l1", "loss must be one of decoder, smooth_l1, mse, normalized, vicreg"),
        ("koopman", "lifting", "rbf", "lifting must be one of mlp, layernorm"),
        ("model", "dropout", 1.0, r"dropout must be in \[0, 1\)"),
        ("model", "dropout", -0.1, r"dropout must be in \[0, 1\)"),
        ("model", "n_layers", 0, "n_layers must be > 0"),
        ("model", "factory", "mypkg.models", _FACTORY_RULE),
        ("model", "factory", "my pkg:build", _FACTORY_RULE),
        ("model", "factory", ":build", _FACTORY_RULE),
        ("data", "vocab_size", 0, "vocab_size must be > 0"),
        ("data", "seq_len", -16, "seq_len must be > 0"),
        ("train", "device", "tpu", "device must be auto, cpu, cuda or cuda:N"),
        ("train", "device", "cuda:x", "device must be auto, cpu, cuda or cuda:N"),
        ("train", "device", "CPU", "device must be auto, cpu, cuda or cuda:N"),
        ("train", "epochs", 0, "epochs must be > 0"),
        ("train", "lr", 0.0, "lr must be > 0"),
        ("train", "grad_clip", -0.5, "grad_clip must be > 0"),
        ("train", "max_steps_per_epoch", -1, "max_steps_per_epoch must be >= 0"),
    ],
)
def test_out_of_range_value_names_rule_key_value_and_origin(section: str, key: str, value: Any, rule: str) -> None:
    shown = repr(float(value) if isinstance(value, int) and key in _FLOAT_KEYS else value)
    pattern = rf"^{rule}, but got {key}={re.escape(shown)} \(run\.toml, \[{section}\.{key}\]\)$"
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict({section: {key: value}}, origin="run.toml")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_rejected(value: float) -> None:
    with pytest.raises(ConfigError, match=r"weight_max must be finite, but got weight_max=(nan|inf)"):
        config_from_dict({"koopman": {"weight_max": value}})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("model", "dropout", 0.0),
        ("model", "dropout", 0.999),
        ("koopman", "fallback_factor", 0),
        ("koopman", "fallback_factor", 1),
        ("koopman", "fallback_batches", 0),
        ("koopman", "weight_max", 0),
        ("koopman", "start_epoch", 0),
        ("koopman", "tokens_per_batch", 0),
        ("train", "device", "cuda:0"),
        ("train", "device", "auto"),
        ("model", "factory", "tests.trainer.custom_model:build"),
        ("model", "factory", ""),
    ],
)
def test_boundary_values_are_accepted(section: str, key: str, value: Any) -> None:
    cfg = config_from_dict({section: {key: value}})
    assert getattr(getattr(cfg, section), key) == value


def test_d_model_not_divisible_by_n_heads_names_both_and_origin() -> None:
    with pytest.raises(ConfigError, match=r"divisible by model\.n_heads, but got d_model=30, n_heads=4 \(run\.toml\)"):
        config_from_dict({"model": {"d_model": 30}}, origin="run.toml")


def test_d_model_divisible_by_n_heads_is_accepted() -> None:
    assert config_from_dict({"model": {"d_model": 30, "n_heads": 5}}).model.d_model == 30


def test_load_config_reads_every_section(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        '[data]\nsource = "builtin"\nvocab_size = 2000\n'
        "[model]\nd_model = 32\n"
        '[koopman]\nschedule = "exponential"\nfallback_threshold = 8\n'
        "[train]\nepochs = 4\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert (cfg.data.vocab_size, cfg.model.d_model, cfg.koopman.schedule) == (2000, 32, "exponential")
    assert (cfg.koopman.fallback_threshold, cfg.train.epochs) == (8.0, 4)


def test_load_config_of_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[koopman\ndim = 128\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} is not valid TOML"):
        load_config(path)


def test_load_config_of_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=rf"config file not found: {re.escape(str(path))}"):
        load_config(path)


def test_load_config_bad_value_names_file_and_table_key(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[koopman]\nfallback_threshold = -1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"fallback_threshold must be > 0, but got fallback_threshold=-1.0 ({path}, [koopman.fallback_threshold])"
    )


def test_with_overrides_applies_and_validates_dotted_keys() -> None:
    cfg = with_overrides(TrainerConfig(), {"koopman.dim": 128, "train.epochs": 3})
    assert (cfg.koopman.dim, cfg.train.epochs) == (128, 3)
    with pytest.raises(ConfigError, match=r"schedule='bogus' \(command line, \[koopman\.schedule\]\)"):
        with_overrides(TrainerConfig(), {"koopman.schedule": "bogus"}, origin="command line")


@pytest.mark.parametrize("dotted", ["koopman", "optimizer.lr", "koopman."])
def test_with_overrides_rejects_unknown_dotted_keys(dotted: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown config key {re.escape(dotted)}=1 \(flags\)"):
        with_overrides(TrainerConfig(), {dotted: 1}, origin="flags")


def test_with_overrides_rejects_an_unknown_key_inside_a_known_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown key koopman\.size=1"):
        with_overrides(TrainerConfig(), {"koopman.size": 1})


@pytest.mark.parametrize("source", ["builtin", "files:../data/wikitext-2", "hf:wikitext/wikitext-2-raw-v1"])
def test_the_three_source_forms_are_accepted(source: str) -> None:
    assert config_from_dict({"data": {"source": source}}).data.source == source


@pytest.mark.parametrize("source", ["wikitext", "files:", "files", "hf:wikitext", "hf:/raw", "Builtin"])
def test_malformed_source_names_the_forms_key_and_value(source: str) -> None:
    expected = rf"^source must be builtin, files:DIR or hf:NAME/CONFIG, but got source={re.escape(repr(source))} "
    with pytest.raises(ConfigError, match=expected + r"\(run\.toml, \[data\.source\]\)$"):
        config_from_dict({"data": {"source": source}}, origin="run.toml")
