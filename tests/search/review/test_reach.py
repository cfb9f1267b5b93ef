"""How close the prune rules came (search/review/reach.py), against hand-computed records."""

from __future__ import annotations

from typing import Any

import pytest

from koopman_search.search.review.reach import (
    against_baseline_text,
    findings,
    noise_text,
    rules_reach,
    weight_bought_text,
)
from koopman_search.search.review.stored import StoredBaseline, StoredRules, TrialFacts


def trial(number: int, weights: list[float], totals: list[float], ppl: list[float], **params: Any) -> TrialFacts:
    epochs = list(range(1, len(totals) + 1))
    columns = {"epoch": epochs, "koopman_weight": weights, "total_loss": totals, "val_ppl": ppl}
    return TrialFacts(number, number + 1, "COMPLETE", dict(params), (1.0, 2.0), columns)


BASELINE = StoredBaseline(
    seed=0,
    state="COMPLETE",
    val_ppl=(1000.0, 800.0, 600.0),
    columns={"epoch": [1, 2, 3], "total_loss": [7.2, 6.8, 6.5], "val_ppl": [1000.0, 800.0, 600.0]},
)
RULES = StoredRules(total_loss_max=7.0, val_ppl_ratio_max=1.3)


def test_closest_values_are_the_highest_judged_ones_with_their_trial_and_epoch() -> None:
    trials = [
        # epoch 1 is pure LM (weight 0): its 7.5 is not judged; epoch 2: 6.93; epoch 3: 6.6
        trial(0, [0.0, 0.1, 0.2], [7.5, 6.93, 6.6], [1000.0, 840.0, 630.0]),
        # epoch 1 would be judged by weight, but the baseline itself is over 7.0 there: unjudged
        trial(1, [0.1, 0.2, 0.3], [7.1, 6.95, 6.7], [1010.0, 808.0, 660.0]),
    ]
    reach = rules_reach(trials, RULES, BASELINE)
    total = reach["total_loss_max"].as_dict()
    assert total["closest"] == {"value": 6.95, "trial": 1, "epoch": 2}
    assert total["fired"] is False and total["limit"] == 7.0
    assert total["text"] == "total_loss_max 7.0: no trial came within 0.71% (closest total_loss 6.95, trial 1, epoch 2)"
    ratio = reach["val_ppl_ratio_max"].as_dict()
    assert ratio["closest"]["value"] == pytest.approx(660.0 / 600.0)
    assert (ratio["closest"]["trial"], ratio["closest"]["epoch"]) == (1, 3)
    assert ratio["text"].startswith("val_ppl_ratio_max 1.3: no trial came within 15%")


def test_a_broken_rule_counts_the_trials_that_broke_it() -> None:
    trials = [
        trial(0, [0.0, 0.5, 0.5], [6.0, 7.2, 7.4], [1000.0, 800.0, 600.0]),
        trial(1, [0.0, 0.5, 0.5], [6.0, 7.0, 6.9], [1000.0, 800.0, 600.0]),  # exactly at the limit: kept
        trial(2, [0.0, 0.5, 0.5], [6.0, 7.01, 6.9], [1000.0, 800.0, 600.0]),
    ]
    total = rules_reach(trials, RULES, BASELINE)["total_loss_max"]
    assert (total.broken_by, total.closest, total.trial, total.epoch) == (2, 7.4, 0, 3)
    assert total.text() == "total_loss_max 7.0: broken by 2 trials (highest total_loss 7.4, trial 0, epoch 3)"


def test_no_judged_epoch_and_missing_rules_are_said_plainly() -> None:
    trials = [trial(0, [0.0], [6.0], [1000.0])]
    reach = rules_reach(trials, StoredRules(total_loss_max=7.0), None)
    assert list(reach) == ["total_loss_max"]  # no ratio limit stored, no baseline: left out
    assert reach["total_loss_max"].as_dict()["closest"] is None
    assert reach["total_loss_max"].text() == "total_loss_max 7.0: no trial has a judged epoch yet"


def test_a_front_of_one_weight_says_the_weight_bought_nothing() -> None:
    same = [trial(i, [0.1], [6.0], [900.0], koopman_weight_max=0.02) for i in range(2)]
    text = weight_bought_text(same, "val_linear_nre")
    assert text is not None and "holds one Koopman weight (koopman_weight_max 0.02)" in text
    assert "bought no val_linear_nre" in text
    spread = [
        trial(0, [0.1], [6.0], [900.0], koopman_weight_max=0.02),
        trial(1, [0.1], [6.0], [910.0], koopman_weight_max=0.3),
    ]
    assert weight_bought_text(spread, "val_linear_nre") is None
    lines = findings(same, RULES, BASELINE, same, ["val_ppl", "val_linear_nre"])
    assert lines[-1] == text and len(lines) == 3
    assert len(findings(same, RULES, BASELINE, same, ["val_ppl"])) == 2  # one objective: no front to read


def _final(number: int, ppl: float, se: float | None, state: str = "COMPLETE") -> TrialFacts:
    columns = {"epoch": [1, 2], "val_ppl": [999.0, ppl], "val_loss_se": [0.5, se]}
    return TrialFacts(number, number + 1, state, {}, (ppl, 1.0), columns)


def test_noise_compares_the_trials_spread_with_two_standard_errors_of_the_validation_set() -> None:
    trials = [
        _final(0, 200.0, 0.004),
        _final(1, 201.0, 0.005),  # 0.5% over the best: within 2 x 0.005 = 1%
        _final(2, 201.9, 0.006),  # 0.95%: within
        _final(3, 230.0, 0.002),  # 15% over
        _final(4, 150.0, 0.001, state="PRUNED"),  # not complete: not counted
    ]
    # median standard error of the four complete trials' last epochs: sorted 0.002, 0.004, 0.005, 0.006 -> 0.005
    assert noise_text(trials) == (
        "val_ppl of the 4 complete trials spans 200.0–230.0 (15% apart); the validation set tells apart differences "
        "over 1% (two standard errors over its batches), so 2 of the others are level with the best; seed-to-seed "
        "noise is not measured (every trial trains with one seed)"
    )


def test_no_noise_finding_without_two_complete_trials_or_a_stored_standard_error() -> None:
    assert noise_text([_final(0, 200.0, 0.004)]) is None
    assert noise_text([_final(0, 200.0, None), _final(1, 210.0, None)]) is None  # a study from before
    lines = findings([_final(0, 200.0, 0.004), _final(1, 210.0, 0.004)], RULES, BASELINE, [], ["val_ppl"])
    assert lines[-1].startswith("val_ppl of the 2 complete trials spans 200.0–210.0 (5% apart)")
    assert "so none of the others is level with the best" in lines[-1]


def _koopman(number: int, nre: float, rank: float) -> TrialFacts:
    columns = {"epoch": [1, 2, 3], "val_linear_nre": [0.2, 0.1, nre], "phi_rank_ratio": [None, 1.0, rank]}
    return TrialFacts(number, number + 1, "COMPLETE", {}, (230.0, nre), columns)


def test_the_front_against_the_baseline_at_the_same_epoch_and_phi_against_the_states() -> None:
    baseline = StoredBaseline(
        0, "complete", (1000.0, 800.0, 600.0), {"epoch": [1, 2, 3], "val_linear_nre": [0.3, 0.25, 0.2]}
    )
    front = [_koopman(0, 0.05, 1.1), _koopman(1, 0.1, 0.7)]
    assert against_baseline_text(front, baseline, ["val_ppl", "val_linear_nre"]) == (
        "the front's 2 trials at the last epoch: val_linear_nre 0.25–0.5× the baseline's at the same epoch; "
        "φ's effective rank 0.7–1.1 of the states' own (phi_rank_ratio; 1 of 2 under 0.8, collapsed)"
    )
    assert against_baseline_text(front[:1], None, ["val_ppl", "val_linear_nre"]) == (
        "the best trial at the last epoch: φ's effective rank 1.1 of the states' own (phi_rank_ratio; 0 of 1 "
        "under 0.8, collapsed)"
    )
    assert against_baseline_text([], baseline, ["val_ppl", "val_linear_nre"]) is None
