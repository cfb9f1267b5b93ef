"""Prune rules: limits, per-epoch baseline, non-finite metrics, and the reasons they give."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest

from koopman_search.search.errors import BaselineError
from koopman_search.search.pruning.rules import (
    FloorRule,
    NonFiniteRule,
    PruneRules,
    TotalLossRule,
    ValPplRatioRule,
    unjudged_epochs,
)
from koopman_search.search.studyfile.prune_settings import RuleSettings
from koopman_search.trainer.errors import ConfigError
from koopman_search.trainer.records import EpochRecord


def record(epoch: int = 5, **values: Any) -> EpochRecord:
    fields: dict[str, Any] = {
        "epoch": epoch,
        "epochs": 10,
        "lm_loss": 6.2,
        "koopman_loss": 2.0,
        "total_loss": 6.3,
        "koopman_weight": 0.07,
        "effective_weight": 0.07,
        "fallback_batches": 0,
        "nonfinite_batches": 0,
        "val_loss": 6.1,
        "val_ppl": 450.0,
        "val_koopman_nre": 0.4,
        "seconds": 1.0,
        "tokens_per_s": 1000.0,
        "steps": 10,
    }
    fields.update(values)
    return EpochRecord(**fields)


# ---- total loss --------------------------------------------------------------------------------------------


def test_total_loss_rule_keeps_exactly_the_limit() -> None:
    assert TotalLossRule(7.0).check(record(total_loss=7.0)) is None


def test_total_loss_rule_prunes_just_above_limit() -> None:
    assert TotalLossRule(7.0).check(record(epoch=7, total_loss=7.0001)) == "total_loss 7.0001 > 7.0 at epoch 7"


def test_total_loss_reason_matches_the_users_table() -> None:
    assert TotalLossRule(7.0).check(record(epoch=7, total_loss=7.1401)) == "total_loss 7.1401 > 7.0 at epoch 7"


def test_total_loss_reason_shows_enough_digits_to_differ_from_the_limit() -> None:
    assert TotalLossRule(7.0).check(record(epoch=2, total_loss=7.000001)) == "total_loss 7.000001 > 7.0 at epoch 2"


def test_total_loss_rule_ignores_epochs_before_the_koopman_loss_is_on() -> None:
    # pure LM epochs are the baseline's own; an early LM loss above the limit says nothing about the trial
    assert TotalLossRule(7.0).check(record(epoch=1, koopman_weight=0.0, total_loss=8.04)) is None
    assert TotalLossRule(7.0).check(record(epoch=2, koopman_weight=0.01, total_loss=7.2)) == (
        "total_loss 7.2 > 7.0 at epoch 2"
    )


@pytest.mark.parametrize("bad", [0, -7.0, math.inf, math.nan])
def test_total_loss_rule_rejects_a_limit_that_is_not_positive_and_finite(bad: float) -> None:
    with pytest.raises(ConfigError, match="total_loss_max must be a finite number > 0"):
        TotalLossRule(bad)


# ---- val perplexity vs the baseline at the same epoch ------------------------------------------------------


def test_ratio_rule_compares_early_epochs_with_the_early_baseline_not_the_final_one() -> None:
    rule = ValPplRatioRule(1.3, [900.0, 600.0, 480.0])
    # 1000 < 1.3 × 900 = 1170 at epoch 1: kept, although 1000 > 1.3 × 480 (the final baseline)
    assert rule.check(record(epoch=1, val_ppl=1000.0)) is None


def test_ratio_rule_prunes_the_same_value_at_a_later_epoch() -> None:
    rule = ValPplRatioRule(1.3, [900.0, 600.0, 480.0])
    assert rule.check(record(epoch=3, val_ppl=1000.0)) == ("val_ppl 1000.0 > 1.3 × baseline 480.0 = 624.0 at epoch 3")


def test_ratio_rule_keeps_exactly_the_limit_and_prunes_just_above() -> None:
    rule = ValPplRatioRule(1.3, [900.0, 600.0, 480.0])
    limit = 1.3 * 600.0
    assert rule.check(record(epoch=2, val_ppl=limit)) is None
    assert rule.check(record(epoch=2, val_ppl=limit + 0.01)) == (
        "val_ppl 780.01 > 1.3 × baseline 600.0 = 780.0 at epoch 2"
    )


def test_ratio_reason_matches_the_users_numbers() -> None:
    rule = ValPplRatioRule(1.3, [477.0] * 10)
    assert rule.check(record(epoch=5, val_ppl=640.2)) == "val_ppl 640.2 > 1.3 × baseline 477.0 = 620.1 at epoch 5"


def test_ratio_rule_raises_when_the_baseline_has_no_entry_for_the_epoch() -> None:
    rule = ValPplRatioRule(1.3, [900.0, 600.0, 480.0])
    with pytest.raises(BaselineError, match=r"no val_ppl for epoch 4: it covers epochs 1\.\.3"):
        rule.check(record(epoch=4))


@pytest.mark.parametrize(
    ("ratio", "baseline", "match"),
    [
        (0.0, [1.0], "val_ppl_ratio_max must be a finite number > 0"),
        (1.3, [], r"one val_ppl per epoch, but got baseline=\[\]"),
        (1.3, [900.0, -1.0], r"baseline\[1\] must be a finite number > 0"),
        (1.3, [math.nan], r"baseline\[0\] must be a finite number > 0"),
    ],
)
def test_ratio_rule_checks_its_arguments(ratio: float, baseline: list[float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ValPplRatioRule(ratio, baseline)


# ---- non-finite metrics ------------------------------------------------------------------------------------


def test_nan_metric_prunes_with_its_name_and_epoch() -> None:
    rule = NonFiniteRule(["val_ppl", "val_koopman_nre"])
    assert rule.check(record(epoch=3, val_koopman_nre=math.nan)) == "val_koopman_nre is nan at epoch 3"


def test_infinite_metric_prunes() -> None:
    assert NonFiniteRule(["total_loss"]).check(record(epoch=2, total_loss=math.inf)) == ("total_loss is inf at epoch 2")


def test_koopman_metrics_are_not_checked_while_the_koopman_loss_is_off() -> None:
    # the trainer reports val_koopman_nre as NaN in epochs before the start epoch
    rule = NonFiniteRule(["val_koopman_nre", "koopman_loss"])
    assert rule.check(record(epoch=2, koopman_weight=0.0, val_koopman_nre=math.nan)) is None


def test_lm_metrics_are_checked_while_the_koopman_loss_is_off() -> None:
    rule = NonFiniteRule(["val_ppl"])
    assert rule.check(record(epoch=1, koopman_weight=0.0, val_ppl=math.nan)) == "val_ppl is nan at epoch 1"


def test_non_finite_rule_rejects_unknown_metrics() -> None:
    with pytest.raises(ConfigError, match=r"metrics must be EpochRecord fields .* but got metric='val_perplexity'"):
        NonFiniteRule(["val_perplexity"])


# ---- the combination ---------------------------------------------------------------------------------------


def test_prune_rules_keep_a_healthy_epoch() -> None:
    rules = PruneRules.from_spec(RuleSettings(), [900.0, 600.0, 480.0, 470.0, 465.0])
    assert rules.check(record(epoch=5, total_loss=6.99, val_ppl=600.0)) is None


def test_prune_rules_report_a_nan_before_the_limits() -> None:
    rules = PruneRules.from_spec(RuleSettings(), [900.0])
    assert rules.check(record(epoch=1, total_loss=math.nan, val_ppl=5000.0)) == "total_loss is nan at epoch 1"


def test_prune_rules_report_total_loss_before_the_ratio() -> None:
    rules = PruneRules.from_spec(RuleSettings(total_loss_max=7.0, val_ppl_ratio_max=1.3), [100.0])
    assert rules.check(record(epoch=1, total_loss=8.0, val_ppl=5000.0)) == "total_loss 8.0 > 7.0 at epoch 1"


def test_prune_rules_use_the_settings_limits() -> None:
    rules = PruneRules.from_spec(RuleSettings(total_loss_max=6.5, val_ppl_ratio_max=2.0), [300.0])
    assert rules.check(record(epoch=1, total_loss=6.4, val_ppl=599.0)) is None
    assert rules.check(record(epoch=1, total_loss=6.6, val_ppl=599.0)) == "total_loss 6.6 > 6.5 at epoch 1"
    assert rules.check(record(epoch=1, total_loss=6.4, val_ppl=601.0)) == (
        "val_ppl 601.0 > 2.0 × baseline 300.0 = 600.0 at epoch 1"
    )


def test_rule_settings_store_the_two_limits() -> None:
    assert RuleSettings().to_dict() == {"total_loss_max": 7.0, "val_ppl_ratio_max": 1.3}


def test_rule_settings_reject_a_zero_limit() -> None:
    with pytest.raises(ConfigError, match="val_ppl_ratio_max must be a finite number > 0, but got"):
        RuleSettings(val_ppl_ratio_max=0.0)


def test_rules_import_neither_optuna_nor_torch() -> None:
    code = (
        "import sys, koopman_search.search.pruning.rules; "
        "print(sorted(m for m in ('optuna', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------- collapse guards


def test_floor_rules_are_off_by_default_and_prune_just_below_their_floor() -> None:
    assert PruneRules.from_spec(RuleSettings(), [500.0] * 10).check(record(phi_effective_rank=1.0)) is None
    rule = FloorRule("phi_effective_rank", 2.0)
    assert rule.check(record(phi_effective_rank=2.0)) is None  # exactly at the floor is kept
    assert rule.check(record(epoch=4, phi_effective_rank=1.9999)) == "phi_effective_rank 1.9999 < 2.0 at epoch 4"
    assert FloorRule("val_koopman_gain", 1.0).check(record(val_koopman_gain=0.9)) is not None
    # not judged before the Koopman loss is on
    assert rule.check(record(koopman_weight=0.0, phi_effective_rank=1.0)) is None


def test_floor_rules_run_from_the_study_settings_and_are_stored_only_when_on() -> None:
    settings = RuleSettings(phi_rank_min=3.0, koopman_gain_min=1.5)
    rules = PruneRules.from_spec(settings, [500.0] * 10)
    assert rules.check(record(val_koopman_gain=1.2, phi_effective_rank=5.0)).startswith("val_koopman_gain 1.2 < 1.5")
    assert settings.to_dict()["phi_rank_min"] == 3.0
    assert "phi_rank_min" not in RuleSettings().to_dict()


@pytest.mark.parametrize("value", [-1.0, math.inf])
def test_a_floor_out_of_range_is_a_config_error(value: float) -> None:
    with pytest.raises(ConfigError, match="floor must be a finite number >= 0"):
        RuleSettings(phi_rank_min=value)


def test_total_loss_rule_skips_epochs_where_the_baseline_itself_is_over_the_limit() -> None:
    rule = TotalLossRule(7.0, baseline_total_loss=[7.5, 7.0, None])
    assert rule.check(record(epoch=1, koopman_weight=0.1, total_loss=7.6)) is None  # the baseline: 7.5 > 7.0
    # exactly at the limit, and unknown, are judged
    assert rule.check(record(epoch=2, koopman_weight=0.1, total_loss=7.6)) == "total_loss 7.6 > 7.0 at epoch 2"
    assert rule.check(record(epoch=3, koopman_weight=0.1, total_loss=7.6)) == "total_loss 7.6 > 7.0 at epoch 3"
    assert unjudged_epochs(7.0, [7.5, 7.0, None, float("nan"), 9.0]) == [1, 5]
