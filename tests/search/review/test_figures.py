"""Figures drawn from the stored records."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from koopman_search.search.review import (
    figures,
    loss_figure,
    pareto_front_figure,
    read_baseline,
    read_rules,
    trial_curves_figure,
    trial_facts,
    val_ppl_figure,
    weight_figure,
)
from koopman_search.search.storage import layout
from tests.search.review.synthetic import (
    BASELINE_VAL_PPL,
    EPOCHS,
    _facts,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- figures ------------------------------------------------------------------------------------------------


def _trace(fig: Any, name_part: str) -> Any:
    matches = [t for t in fig.data if name_part in (t.name or "")]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def test_loss_figure_draws_lm_koopman_total_and_the_7_limit(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.PRUNED, "original settings")
    fig = loss_figure(facts, read_rules(layout.study_attrs(study)))
    limit = _trace(fig, "total loss limit 7")
    assert list(limit.y) == [7.0, 7.0] and list(limit.x) == [1, EPOCHS]
    assert list(_trace(fig, "LM loss").y) == facts.metric("lm_loss")
    koopman = _trace(fig, "Koopman loss")
    assert koopman.yaxis == "y2"  # its own scale
    start = facts.params["koopman_start_epoch"]
    assert list(koopman.y) == [None] * start + facts.metric("koopman_loss")[start:]  # a gap while it is off
    total = _trace(fig, "total loss =")
    assert total.y[-1] > 7.0  # it was pruned for this
    marker = _trace(fig, "pruned here")
    assert list(marker.x) == [facts.pruned_epoch] and marker.text[0] == facts.prune_reason


def test_val_ppl_figure_draws_baseline_curve_and_the_ratio_band(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.COMPLETE, "hand-tuned 1")
    fig = val_ppl_figure(facts, read_baseline(layout.study_attrs(study)), read_rules(layout.study_attrs(study)))
    baseline = _trace(fig, "baseline (Koopman off")
    assert list(baseline.y) == BASELINE_VAL_PPL
    band = _trace(fig, "limit 1.3 × baseline")
    assert band.fill == "tonexty" and fig.data.index(band) == fig.data.index(baseline) + 1
    assert band.y == pytest.approx([1.3 * v for v in BASELINE_VAL_PPL])
    assert list(_trace(fig, "this trial").y) == facts.metric("val_ppl")


def test_weight_figure_shows_scheduled_effective_and_fallback_bars_on_a_second_axis(
    study: optuna.Study,
) -> None:
    facts = _facts(study, TrialState.COMPLETE, "hand-tuned 3")
    fig = weight_figure(facts)
    scheduled, applied = facts.metric("koopman_weight"), facts.metric("effective_weight")
    # each epoch's weight is a step over its slot e - 0.5 .. e + 0.5: the ends repeat half an epoch out
    assert list(_trace(fig, "scheduled").y) == [scheduled[0], *scheduled, scheduled[-1]]
    assert list(_trace(fig, "applied").y) == [applied[0], *applied, applied[-1]]
    epochs = facts.epoch_numbers
    assert list(_trace(fig, "applied").x) == [epochs[0] - 0.5, *epochs, epochs[-1] + 0.5]
    assert _trace(fig, "applied").line.shape == "hvh"
    bars = _trace(fig, "fallback batches")
    assert bars.type == "bar" and bars.yaxis == "y2"
    assert list(bars.x) == epochs and bars.width == 0.9  # centred in the same slots as the steps
    assert fig.layout.xaxis.range == (0.5, epochs[-1] + 0.5)  # the last epoch as wide as the others
    assert sum(bars.y) > 0  # threshold 6 is under this trial's Koopman loss at first
    assert fig.layout.yaxis2.overlaying == "y"
    assert fig.layout.yaxis2.dtick == 4 and fig.layout.yaxis2.range == pytest.approx((0, 22))  # up to 20 batches


@pytest.mark.parametrize(
    ("top", "dtick", "tickformat"),
    [(2.6, 0.5, ".1f"), (0.21, 0.05, ".2f"), (0.0031, 0.001, ".3f"), (48.0, 10, ".0f"), (1.0, 0.2, ".1f")],
)
def test_axis_ticks_are_round_steps_with_one_number_of_decimals(top: float, dtick: float, tickformat: str) -> None:
    ticks = figures._nice_ticks(top)
    assert ticks["dtick"] == pytest.approx(dtick) and ticks["tickformat"] == tickformat and ticks["tick0"] == 0


def test_the_koopman_loss_axis_has_round_ticks(study: optuna.Study) -> None:
    facts = [trial_facts(t) for t in study.get_trials()]
    fig = trial_curves_figure("losses", facts, None, read_rules(layout.study_attrs(study)))
    axis = fig.layout.yaxis2
    steps = axis.range[1] / axis.dtick
    assert 2 <= steps <= 6 and axis.tick0 == 0
    assert float(f"{axis.dtick:.0e}") == pytest.approx(axis.dtick)  # 1, 2 or 5 x 10^k


def test_the_linearity_view_draws_each_trial_against_the_baselines_own_curve(study: optuna.Study) -> None:
    facts = [trial_facts(t) for t in study.get_trials()]
    attrs = layout.study_attrs(study)
    baseline = read_baseline(attrs)
    assert baseline is not None and baseline.columns is not None
    pruned = next(f for f in facts if f.state == "PRUNED")
    pruned.user_attrs["pruned_by"] = "asha"  # a pruner ranks on both objectives
    fig = trial_curves_figure("linearity", facts, baseline, read_rules(attrs), selected=pruned.number)
    assert list(_trace(fig, "baseline").y) == list(baseline.columns["val_linear_nre"])
    assert list(_trace(fig, "this trial").y) == pruned.metric("val_linear_nre")
    marker = _trace(fig, "pruned here")
    assert list(marker.x) == [pruned.pruned_epoch]
    assert "val_linear_nre" in fig.layout.yaxis.title.text


def test_trial_curves_figure_has_one_menu_entry_per_trial_with_records(study: optuna.Study) -> None:
    facts = [trial_facts(t) for t in study.get_trials()]
    with_records = sorted(f.number for f in facts if f.epoch_numbers)
    selected = with_records[2]
    fig = trial_curves_figure("losses", facts, None, read_rules(layout.study_attrs(study)), selected=selected)
    menu = fig.layout.updatemenus[0]
    assert [b.label.split(" · ")[0] for b in menu.buttons] == [f"Trial {n}" for n in with_records]
    assert menu.active == 2
    assert menu.buttons[menu.active].label.startswith(f"Trial {selected} · ")
    # every entry restyles the same highlighted traces, with that trial's own data
    chosen = menu.buttons[0]
    restyle, slots = chosen.args
    first = next(f for f in facts if f.number == with_records[0])
    assert restyle["y"][1] == first.metric("lm_loss") and len(slots) == 4  # the total first, under the LM line
    assert _trace(fig, "all trials' total loss").line.color.startswith("rgba")


def test_trial_curves_menu_keeps_the_latest_trials_and_the_selected_one(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    from koopman_search.search.review import figures

    monkeypatch.setattr(figures, "MAX_DROPDOWN_TRIALS", 2)
    facts = [trial_facts(t) for t in study.get_trials()]
    drawn = sorted(f.number for f in facts if f.epoch_numbers)
    fig = trial_curves_figure("val_ppl", facts, selected=drawn[0])
    menu = fig.layout.updatemenus[0]
    assert [b.label.split(" · ")[0] for b in menu.buttons] == [f"Trial {n}" for n in [drawn[0], *drawn[-2:]]]
    assert menu.active == 0
    background = _trace(fig, "all trials")
    assert sum(x is None for x in background.x) == len(drawn)  # every trial drawn behind, one gap after each


def test_trial_curves_figure_without_trials_still_shows_the_baseline(study: optuna.Study) -> None:
    fig = trial_curves_figure(
        "val_ppl", [], read_baseline(layout.study_attrs(study)), read_rules(layout.study_attrs(study))
    )
    assert "no finished trial yet" in fig.layout.title.text
    assert list(_trace(fig, "baseline (Koopman off").y) == BASELINE_VAL_PPL


def test_pareto_front_figure_stars_the_hand_tuned_trials(study: optuna.Study) -> None:
    facts = [trial_facts(t) for t in study.get_trials()]
    fig = pareto_front_figure(study, ["val_ppl", "val_koopman_nre"], facts, read_baseline(layout.study_attrs(study)))
    for label in ("hand-tuned 1", "hand-tuned 2", "hand-tuned 3"):
        trial = next(f for f in facts if f.label == label)
        star = _trace(fig, f"★ {label} (trial {trial.number})")
        assert (star.x[0], star.y[0]) == trial.values and star.marker.symbol == "star"
    assert _trace(fig, "☆ original settings: pruned at epoch 6")  # pruned options are listed in the legend
    assert fig.layout.xaxis.title.text == "val_ppl"
    assert [s.x0 for s in fig.layout.shapes] == [477.2]  # the baseline's final val perplexity


def test_menu_entries_name_a_complete_trials_first_objective_and_a_pruned_trials_epoch(
    study: optuna.Study,
) -> None:
    facts = [trial_facts(t) for t in study.get_trials()]
    fig = trial_curves_figure("val_ppl", facts, names=["val_ppl", "val_koopman_nre"])
    labels = {b.label.split(" · ")[0]: b.label for b in fig.layout.updatemenus[0].buttons}
    complete = _facts(study, TrialState.COMPLETE, "hand-tuned 1")
    pruned = _facts(study, TrialState.PRUNED, "original settings")
    assert (
        labels[f"Trial {complete.number}"]
        == f"Trial {complete.number} · val_ppl {complete.values[0]:.5g} · hand-tuned 1"
    )
    assert labels[f"Trial {pruned.number}"] == f"Trial {pruned.number} · pruned at epoch 6 · original settings"
    assert f"Trial {_facts(study, TrialState.FAIL).number}" not in labels  # no records, nothing to draw


def test_loss_figure_keeps_the_first_koopman_point_off_the_limits_level_and_the_lm_line_on_top(
    study: optuna.Study,
) -> None:
    facts = _facts(study, TrialState.PRUNED, "original settings")
    fig = loss_figure(facts, read_rules(layout.study_attrs(study)))
    koopman = [v for v in _trace(fig, "Koopman loss").y if v is not None]
    lo, hi = fig.layout.yaxis.range
    top = fig.layout.yaxis2.range[1]
    limit_height = (7.0 - lo) / (hi - lo)  # where the limit line sits, as a fraction of the plot's height
    assert 0 < limit_height < 1
    assert abs(max(koopman) / top - limit_height) >= 0.25  # the Koopman peak is nowhere near the limit line
    assert lo <= min(facts.metric("lm_loss")) and max(facts.metric("total_loss")) <= hi
    assert fig.layout.yaxis2.tickformat.endswith("f") and fig.layout.yaxis2.dtick  # round ticks, not 0.002882
    names = [t.name for t in fig.data]
    total = names.index("total loss = LM + weight × Koopman")
    assert names.index("LM loss") > total and fig.data[total].opacity < 1  # drawn over the pale, wide total


def test_weights_are_drawn_as_steps_so_a_step_schedule_jumps(study: optuna.Study) -> None:
    fig = weight_figure(_facts(study, TrialState.COMPLETE, "hand-tuned 1"))
    assert _trace(fig, "scheduled weight").line.shape == "hvh"
    assert _trace(fig, "applied weight").line.shape == "hvh"


def test_the_spectrum_figure_draws_each_blocks_eigenvalues_and_the_unit_circle(study: optuna.Study) -> None:
    from koopman_search.search.review.figures import spectrum_figure
    from koopman_search.trainer.records import K_EIGS_PER_BLOCK

    facts = [trial_facts(t) for t in study.get_trials()]
    with_spectrum = [f for f in facts if f.metric("koopman_k_eig_re") and any(f.metric("koopman_k_eig_re"))]
    selected = with_spectrum[-1]
    fig = spectrum_figure(facts, selected=selected.number)
    circle, *blocks = fig.data
    assert circle.name == "|λ| = 1"
    assert max(math.hypot(x, y) for x, y in zip(circle.x, circle.y, strict=True)) == pytest.approx(1.0)
    assert [b.name for b in blocks] == ["block 1", "block 2"]
    last_re = [v for v in selected.metric("koopman_k_eig_re") if v][-1]
    last_im = [v for v in selected.metric("koopman_k_eig_im") if v][-1]
    assert list(blocks[0].x) == pytest.approx(last_re[:K_EIGS_PER_BLOCK])
    assert list(blocks[1].y) == pytest.approx(last_im[K_EIGS_PER_BLOCK:])
    (menu,) = fig.layout.updatemenus
    assert len(menu.buttons) == len(with_spectrum)
    assert fig.layout.yaxis.scaleanchor == "x"  # a circle looks like one
    empty = spectrum_figure([f for f in facts if f not in with_spectrum])
    assert len(empty.data) == 1 and "no trial" in empty.layout.title.text


def test_a_pruned_trial_is_marked_on_the_curve_it_was_pruned_on(study: optuna.Study) -> None:
    import dataclasses

    attrs = layout.study_attrs(study)
    baseline, rules = read_baseline(attrs), read_rules(attrs)
    by_rule = _facts(study, TrialState.PRUNED, "original settings")  # the total-loss rule
    assert by_rule.prune_reason.startswith("total_loss")
    assert list(_trace(loss_figure(by_rule, rules), "pruned here").x) == [by_rule.pruned_epoch]
    assert list(_trace(val_ppl_figure(by_rule, baseline, rules), "pruned here").x) == []
    reason = "asha: rung 1 (Koopman epoch 1, epoch 4): rank 5 of 6 on (val_ppl, val_linear_nre), keeps top 2"
    by_asha = dataclasses.replace(
        by_rule, user_attrs={**by_rule.user_attrs, layout.PRUNE_REASON: reason, layout.PRUNED_BY: "asha"}
    )
    assert list(_trace(loss_figure(by_asha, rules), "pruned here").x) == []  # no limit was crossed there
    marker = _trace(val_ppl_figure(by_asha, baseline, rules), "pruned here")
    assert list(marker.x) == [by_asha.pruned_epoch] and marker.text[0] == reason
