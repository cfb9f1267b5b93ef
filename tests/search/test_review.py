"""Review: trial notes, figures from stored records, dashboard annotations, the HTML report and its command.

The study under review is built directly in SQLite with the storage layout the search writes (study attrs
``koopman_search`` and ``baseline:seed=0``, trial attrs ``records``, ``prune_reason``, ...), its records
encoded by :func:`search.layout.records_to_columns` and its prune decisions made by
:class:`search.rules.PruneRules`, so no training runs here.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import optuna_dashboard
import pytest
import tomllib
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from search import layout
from search.cli import main
from search.errors import StorageError
from search.layout import columns_to_records, records_to_columns, round_significant
from search.review import (
    FIGURE_IDS,
    annotate_storage,
    annotate_study,
    annotate_trial,
    build_report,
    is_loopback,
    loss_figure,
    params_toml,
    pareto_front_figure,
    read_baseline,
    read_rules,
    trial_curves_figure,
    trial_facts,
    trial_note,
    val_ppl_figure,
    weight_figure,
    write_report,
)
from search.review.dashboard import Refresher
from search.review.report import SECTION_TITLES
from search.rules import PruneRules
from search.spec import spec_from_dict
from trainer.records import RECORD_FIELDS, EpochRecord

REPO = Path(__file__).resolve().parents[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)

# ---- a small finished study, as the search would have stored it ----------------------------------------------

STUDY_NAME = "review-demo"
EPOCHS = 10
STEPS = 50
# The baseline (Koopman off, seed 0): the user's 477 at the end.
BASELINE_VAL_PPL = [1402.5, 981.3, 760.2, 641.7, 569.9, 529.4, 504.8, 490.3, 481.6, 477.2]
BASELINE_LM = [7.251, 6.894, 6.633, 6.462, 6.348, 6.271, 6.224, 6.196, 6.178, 6.164]

DISTRIBUTIONS = {
    "koopman_weight_max": FloatDistribution(0.01, 0.5, log=True),
    "koopman_start_epoch": IntDistribution(0, 9),
    "fallback_threshold": FloatDistribution(1.0, 20.0),
    "schedule": CategoricalDistribution(["linear", "exponential", "step", "cosine"]),
    "koopman_dim": CategoricalDistribution([128, 256]),
}


@dataclass(frozen=True)
class Plan:
    """One synthetic trial: its params and how its curves bend (not a model of training, just plausible)."""

    weight_max: float
    start: int
    threshold: float
    schedule: str
    dim: int
    koopman0: float  # raw Koopman loss in the first Koopman epoch
    koopman_growth: float  # per-epoch factor
    ppl_cost: float  # val ppl ratio to the baseline at full weight
    label: str | None = None
    fail: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {
            "koopman_weight_max": self.weight_max,
            "koopman_start_epoch": self.start,
            "fallback_threshold": self.threshold,
            "schedule": self.schedule,
            "koopman_dim": self.dim,
        }


PLANS = [
    Plan(0.05, 4, 8.0, "linear", 128, 3.1, 0.78, 1.02, label="hand-tuned 1"),
    Plan(0.1, 5, 7.0, "exponential", 128, 2.9, 0.8, 1.05, label="hand-tuned 2"),
    Plan(0.02, 5, 6.0, "linear", 128, 3.4, 0.82, 1.01, label="hand-tuned 3"),
    # the user's original settings: the total loss climbs over 7.0 (docs/design.md, "The user's setup")
    Plan(0.5, 3, 10.0, "linear", 256, 2.06, 1.45, 1.2, label="original settings"),
    Plan(0.3, 2, 4.0, "step", 256, 6.0, 0.9, 1.6),  # val ppl jumps over 1.3 × baseline
    Plan(0.08, 3, 12.0, "cosine", 256, 2.5, 0.7, 1.03),
    Plan(0.2, 6, 9.0, "linear", 128, 2.2, 0.75, 1.09),
    Plan(0.03, 5, 5.0, "exponential", 256, 3.0, 0.72, 1.0),
    Plan(
        0.1,
        4,
        8.0,
        "linear",
        256,
        0.0,
        0.0,
        1.0,
        fail="CUDA out of memory at epoch 5 (tried to allocate 2.0 GiB)",
    ),
]


def _weight(plan: Plan, epoch: int) -> float:
    if epoch <= plan.start:
        return 0.0
    frac = (epoch - plan.start) / (EPOCHS - plan.start)
    if plan.schedule == "linear":
        return plan.weight_max * frac
    if plan.schedule == "exponential":
        return plan.weight_max * (math.exp(3 * frac) - 1) / (math.exp(3) - 1)
    if plan.schedule == "step":
        return plan.weight_max
    return plan.weight_max * 0.5 * (1 - math.cos(math.pi * frac))


def plan_records(plan: Plan) -> list[EpochRecord]:
    records = []
    for e in range(1, EPOCHS + 1):
        on = e > plan.start
        weight = _weight(plan, e)
        koopman = plan.koopman0 * plan.koopman_growth ** (e - plan.start - 1) if on else 0.0
        fallback = max(0, round(20 * (koopman - 0.4 * plan.threshold))) if on else 0
        fallback = min(fallback, STEPS)
        effective = weight * (1 - 0.99 * fallback / STEPS)
        lm = BASELINE_LM[e - 1] + (0.4 * weight if on else 0.0)
        ppl = BASELINE_VAL_PPL[e - 1] * (1 + (plan.ppl_cost - 1) * (weight / plan.weight_max if on else 0.0))
        seconds = 96.0 if on else 78.0
        records.append(
            EpochRecord(
                epoch=e,
                epochs=EPOCHS,
                lm_loss=lm,
                koopman_loss=koopman,
                total_loss=lm + effective * koopman,
                koopman_weight=weight,
                effective_weight=effective,
                fallback_batches=fallback,
                nonfinite_batches=0,
                val_loss=math.log(ppl),
                val_ppl=ppl,
                val_koopman_nre=0.9 * math.exp(-5 * plan.weight_max) * 0.92 ** (e - plan.start - 1) if on else math.nan,
                seconds=seconds,
                tokens_per_s=STEPS * 32 * 128 / seconds,
                steps=STEPS,
            )
        )
    return records


def baseline_records() -> list[EpochRecord]:
    return [
        EpochRecord(
            epoch=e,
            epochs=EPOCHS,
            lm_loss=BASELINE_LM[e - 1],
            koopman_loss=0.0,
            total_loss=BASELINE_LM[e - 1],
            koopman_weight=0.0,
            effective_weight=0.0,
            fallback_batches=0,
            nonfinite_batches=0,
            val_loss=math.log(BASELINE_VAL_PPL[e - 1]),
            val_ppl=BASELINE_VAL_PPL[e - 1],
            val_koopman_nre=math.nan,
            seconds=78.0,
            tokens_per_s=STEPS * 32 * 128 / 78.0,
            steps=STEPS,
        )
        for e in range(1, EPOCHS + 1)
    ]


def study_file_values(name: str = STUDY_NAME, objectives: list[str] | None = None) -> dict[str, Any]:
    study: dict[str, Any] = {"name": name}
    if objectives is not None:
        study["objectives"] = [{"metric": m, "direction": "minimize"} for m in objectives]
    return {"study": study, "trainer": {"train": {"epochs": EPOCHS}}}


def store_trial(
    study: optuna.Study, plan: Plan, rules: PruneRules, metrics: tuple[str, ...] = ("val_ppl", "val_koopman_nre")
) -> None:
    """One trial as a worker stores it: run the prune rules over its epochs, keep what it trained."""
    if plan.fail:
        study.add_trial(layout.finished_trial(TrialState.FAIL, plan.params, DISTRIBUTIONS, [],
                                              epochs_from_warmup=plan.start, label=plan.label,
                                              fail_reason=plan.fail))
        return
    kept: list[EpochRecord] = []
    reason = None
    for record in plan_records(plan):
        kept.append(record)
        if record.epoch > plan.start:
            reason = rules.check(record)
            if reason:
                break
    last = kept[-1]
    study.add_trial(layout.finished_trial(
        TrialState.PRUNED if reason else TrialState.COMPLETE, plan.params, DISTRIBUTIONS, kept,
        epochs_from_warmup=plan.start, label=plan.label, prune_reason=reason,
        values=None if reason else [float(f"{getattr(last, m):.6g}") for m in metrics],
    ))


def make_review_study(
    storage_url: str,
    plans: list[Plan] | None = None,
    name: str = STUDY_NAME,
    objectives: list[str] | None = None,
) -> optuna.Study:
    """The finished two-objective study the review tests look at (COMPLETE, PRUNED and FAIL trials)."""
    spec = spec_from_dict(study_file_values(name, objectives), origin="review.toml")
    directions = [optuna.study.StudyDirection[d.upper()] for d in spec.directions]
    study = optuna.create_study(study_name=name, storage=storage_url, directions=directions)
    study.set_user_attr(layout.SPEC_ATTR, layout.stored_spec(spec))
    base = baseline_records()
    study.set_user_attr(
        layout.baseline_key(0),
        {
            "state": "complete",
            "records": records_to_columns(base),
            "val_ppl": [round_significant(r.val_ppl) for r in base],
            "error": None,
            "checkpoints": {},
        },
    )
    rules = PruneRules.from_spec(spec.rules, [r.val_ppl for r in base])
    for plan in PLANS if plans is None else plans:
        store_trial(study, plan, rules, tuple(spec.metrics))
    return study


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'review-demo.db'}"


@pytest.fixture
def study(storage_url: str) -> optuna.Study:
    return make_review_study(storage_url)


def _trial(study: optuna.Study, state: TrialState, label: str | None = None) -> optuna.trial.FrozenTrial:
    for t in study.get_trials(states=(state,)):
        if label is None or t.user_attrs.get("label") == label:
            return t
    raise LookupError(f"no {state.name} trial labelled {label!r}")


def _facts(study: optuna.Study, state: TrialState, label: str | None = None) -> Any:
    return trial_facts(_trial(study, state, label))


def test_synthetic_study_has_the_trial_states_the_review_must_show(study: optuna.Study) -> None:
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 6
    assert states.count(TrialState.PRUNED) == 2
    assert states.count(TrialState.FAIL) == 1
    original = _trial(study, TrialState.PRUNED, "original settings")
    assert original.user_attrs["prune_reason"].startswith("total_loss ")
    assert "> 7.0 at epoch" in original.user_attrs["prune_reason"]


# ---- the columnar record encoding ---------------------------------------------------------------------------


def test_records_to_columns_keeps_six_significant_digits_and_stores_nan_as_none() -> None:
    record = baseline_records()[0]
    record = EpochRecord(**{**record.to_dict(), "lm_loss": 7.140123456, "val_koopman_nre": math.inf})
    columns = records_to_columns([record, baseline_records()[1]])
    assert set(columns) == set(RECORD_FIELDS)
    assert columns["lm_loss"][0] == 7.14012
    assert columns["val_koopman_nre"] == [None, None]
    assert columns["epoch"] == [1, 2] and all(type(e) is int for e in columns["epoch"])
    json.dumps(columns, allow_nan=False)  # storable as strict JSON


def test_columns_to_records_reads_none_back_as_nan() -> None:
    back = columns_to_records(records_to_columns(baseline_records()))
    assert [r.epoch for r in back] == list(range(1, EPOCHS + 1))
    assert math.isnan(back[0].val_koopman_nre)
    assert back[-1].val_ppl == 477.2


def test_round_significant_keeps_zero_and_small_values() -> None:
    assert round_significant(0.0) == 0.0
    assert round_significant(0.000123456789) == 0.000123457
    assert round_significant(-math.inf) is None


def test_columns_to_records_rejects_ragged_columns() -> None:
    columns = records_to_columns(baseline_records())
    columns["val_ppl"] = columns["val_ppl"][:-1]
    with pytest.raises(StorageError, match=r"one length, but got lengths=.*'val_ppl': 9"):
        columns_to_records(columns)


def test_columns_to_records_rejects_a_missing_field() -> None:
    columns = records_to_columns(baseline_records())
    del columns["total_loss"]
    with pytest.raises(StorageError, match=r"missing=\['total_loss'\]"):
        columns_to_records(columns)


# ---- stored facts -------------------------------------------------------------------------------------------


def test_read_rules_and_baseline_from_study_attrs(study: optuna.Study) -> None:
    rules = read_rules(study.user_attrs)
    assert (rules.total_loss_max, rules.val_ppl_ratio_max) == (7.0, 1.3)
    baseline = read_baseline(study.user_attrs)
    assert baseline is not None and baseline.seed == 0 and baseline.state == "complete"
    assert baseline.at(10) == 477.2 and baseline.at(11) is None and baseline.at(0) is None


def test_epochs_saved_by_pruning_is_epochs_minus_run_minus_warmup(study: optuna.Study) -> None:
    pruned = _facts(study, TrialState.PRUNED, "original settings")
    assert pruned.epochs_from_warmup == 3
    assert pruned.epochs_saved_by_pruning == EPOCHS - pruned.epochs_run - 3
    assert pruned.epochs_saved_by_pruning > 0
    complete = _facts(study, TrialState.COMPLETE, "hand-tuned 1")
    assert complete.epochs_saved_by_pruning == 0 and complete.epochs_run == EPOCHS - 4


# ---- notes --------------------------------------------------------------------------------------------------


def test_note_of_pruned_trial_gives_reason_epoch_and_baseline_ratio(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.PRUNED, "original settings")
    note = trial_note(
        facts, ["val_ppl", "val_koopman_nre"], read_baseline(study.user_attrs), read_rules(study.user_attrs)
    )
    epoch = facts.pruned_epoch
    assert f"### Trial {facts.number}: pruned at epoch {epoch}" in note
    assert f"**Pruned:** total\\_loss {facts.prune_reason.split(' ', 1)[1]}" in note
    ppl = facts.metric("val_ppl")[-1]
    ratio = ppl / BASELINE_VAL_PPL[epoch - 1]
    assert f"| val perplexity | {ppl:.5g} | {BASELINE_VAL_PPL[epoch - 1]:.5g} | {ratio:.3f}× (limit 1.3×) |" in note
    assert f"{facts.epochs_saved_by_pruning} saved by pruning" in note
    assert "3 taken from the baseline's shared warmup" in note


def test_note_of_complete_trial_gives_objective_values_and_params(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.COMPLETE, "hand-tuned 2")
    note = trial_note(
        facts, ["val_ppl", "val_koopman_nre"], read_baseline(study.user_attrs), read_rules(study.user_attrs)
    )
    assert "hand-tuned 2" in note
    assert f"**Result:** val\\_ppl = {facts.values[0]:.5g}, val\\_koopman\\_nre = {facts.values[1]:.5g}" in note
    header = "| koopman\\_weight\\_max | koopman\\_start\\_epoch | fallback\\_threshold | schedule | koopman\\_dim |"
    assert f"{header}\n|---|---|---|---|---|\n| 0.1 | 5 | 7.0 | exponential | 128 |" in note
    assert "| at epoch 10 |" in note and "saved by pruning" not in note


def test_note_of_val_ppl_pruned_trial_says_the_ratio_is_over(study: optuna.Study) -> None:
    pruned = [t for t in study.get_trials(states=(TrialState.PRUNED,)) if "val_ppl" in t.user_attrs["prune_reason"]]
    assert len(pruned) == 1
    note = trial_note(
        trial_facts(pruned[0]),
        ["val_ppl", "val_koopman_nre"],
        read_baseline(study.user_attrs),
        read_rules(study.user_attrs),
    )
    assert "(limit 1.3×, over)" in note


def test_note_of_failed_trial_gives_the_error(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.FAIL)
    note = trial_note(facts, ["val_ppl", "val_koopman_nre"], None, read_rules(study.user_attrs))
    assert "**Failed:** CUDA out of memory at epoch 5" in note
    assert "No epoch records were stored for this trial." in note


# ---- figures ------------------------------------------------------------------------------------------------


def _trace(fig: Any, name_part: str) -> Any:
    matches = [t for t in fig.data if name_part in (t.name or "")]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def test_loss_figure_draws_lm_koopman_total_and_the_7_limit(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.PRUNED, "original settings")
    fig = loss_figure(facts, read_rules(study.user_attrs))
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
    fig = val_ppl_figure(facts, read_baseline(study.user_attrs), read_rules(study.user_attrs))
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
    assert list(_trace(fig, "scheduled").y) == facts.metric("koopman_weight")
    assert list(_trace(fig, "applied").y) == facts.metric("effective_weight")
    bars = _trace(fig, "fallback batches")
    assert bars.type == "bar" and bars.yaxis == "y2"
    assert sum(bars.y) > 0  # threshold 6 is under this trial's Koopman loss at first
    assert fig.layout.yaxis2.overlaying == "y"
    assert fig.layout.yaxis2.dtick == 4 and fig.layout.yaxis2.range == pytest.approx((0, 22))  # up to 20 batches


def test_trial_curves_figure_has_one_menu_entry_per_trial_with_records(study: optuna.Study) -> None:
    facts = [trial_facts(t) for t in study.get_trials()]
    with_records = sorted(f.number for f in facts if f.epoch_numbers)
    selected = with_records[2]
    fig = trial_curves_figure("losses", facts, None, read_rules(study.user_attrs), selected=selected)
    menu = fig.layout.updatemenus[0]
    assert [b.label.split(" · ")[0] for b in menu.buttons] == [f"Trial {n}" for n in with_records]
    assert menu.active == 2
    assert menu.buttons[menu.active].label.startswith(f"Trial {selected} · ")
    # every entry restyles the same highlighted traces, with that trial's own data
    chosen = menu.buttons[0]
    restyle, slots = chosen.args
    first = next(f for f in facts if f.number == with_records[0])
    assert restyle["y"][0] == first.metric("lm_loss") and len(slots) == 4
    assert _trace(fig, "all trials' total loss").line.color.startswith("rgba")


def test_trial_curves_menu_keeps_the_latest_trials_and_the_selected_one(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search.review import figures

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
    fig = trial_curves_figure("val_ppl", [], read_baseline(study.user_attrs), read_rules(study.user_attrs))
    assert "no finished trial yet" in fig.layout.title.text
    assert list(_trace(fig, "baseline (Koopman off").y) == BASELINE_VAL_PPL


def test_pareto_front_figure_stars_the_hand_tuned_trials(study: optuna.Study) -> None:
    facts = [trial_facts(t) for t in study.get_trials()]
    fig = pareto_front_figure(study, ["val_ppl", "val_koopman_nre"], facts, read_baseline(study.user_attrs))
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


# ---- dashboard annotations ----------------------------------------------------------------------------------


def _note_of(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    return optuna_dashboard._note.get_note_from_system_attrs(system_attrs, trial._trial_id)["body"]


def _figure_ids(study: optuna.Study) -> set[str]:
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    return set(optuna_dashboard._custom_plot_data.list_graph_object_ids(system_attrs))


def test_annotate_study_writes_every_note_and_the_study_figures(study: optuna.Study) -> None:
    counts = annotate_study(study)
    assert counts.notes_written == len(study.trials) + 1  # every finished trial and the study
    for trial in study.get_trials():
        assert _note_of(study, trial).startswith(f"### Trial {trial.number}: ")
    pruned = _trial(study, TrialState.PRUNED, "original settings")
    assert pruned.user_attrs["prune_reason"].split(" ", 1)[1] in _note_of(study, pruned)
    assert optuna_dashboard.get_note(study).startswith(f"## {STUDY_NAME}")
    assert _figure_ids(study) == set(FIGURE_IDS.values())
    assert study.metric_names == ["val_ppl", "val_koopman_nre"]


def test_annotate_study_twice_writes_nothing_new(study: optuna.Study) -> None:
    annotate_study(study)
    again = annotate_study(study)
    assert again.notes_written == 0 and again.figures_written == 0
    assert again.notes_unchanged == len(study.trials) + 1


def test_annotate_study_keeps_a_note_edited_in_the_dashboard(study: optuna.Study) -> None:
    annotate_study(study)
    trial = study.trials[0]
    edited = "my own reading of this trial"
    optuna_dashboard._note.save_note_with_version(study._storage, study._study_id, trial._trial_id, 9, edited)
    counts = annotate_study(study)
    assert counts.notes_kept == 1 and _note_of(study, trial) == edited


def test_annotate_study_rewrites_its_own_note_when_the_facts_change(study: optuna.Study) -> None:
    annotate_study(study)
    before = optuna_dashboard.get_note(study)
    store_trial(study, PLANS[0], PruneRules.from_spec(spec_from_dict(study_file_values()).rules, BASELINE_VAL_PPL))
    counts = annotate_study(study)
    assert counts.notes_written == 2  # the new trial's and the study's
    assert optuna_dashboard.get_note(study) != before and "7 complete" in optuna_dashboard.get_note(study)


def test_annotate_trial_from_the_objective_writes_the_note_of_the_running_trial(study: optuna.Study) -> None:
    annotate_study(study)
    trial = study.ask(DISTRIBUTIONS)
    plan = PLANS[1]
    records = plan_records(plan)
    trial.set_user_attr("records", records_to_columns(records))
    trial.set_user_attr("epochs_run", EPOCHS - plan.start)
    trial.set_user_attr("epochs_from_warmup", plan.start)
    values = [records[-1].val_ppl, records[-1].val_koopman_nre]
    assert annotate_trial(study, trial, values=values) is True
    study.tell(trial, values)
    frozen = study.trials[-1]
    note = _note_of(study, frozen)
    assert note.startswith(f"### Trial {frozen.number}: complete")
    assert f"val\\_ppl = {values[0]:.5g}" in note
    # the study pass afterwards finds the same note: nothing to rewrite
    assert annotate_study(study).notes_written == 1  # only the study note


def test_annotate_trial_uses_the_given_baseline_and_rules(study: optuna.Study) -> None:
    trial = study.ask(DISTRIBUTIONS)
    trial.set_user_attr("records", records_to_columns(plan_records(PLANS[0])))
    assert annotate_trial(
        study,
        trial,
        values=[500.0, 0.2],
        baseline_curve=[250.0] * EPOCHS,
        rules={"total_loss_max": 6.5, "val_ppl_ratio_max": 2.0},
    )
    note = optuna_dashboard.get_note(trial)
    assert "| 250.0 |" in note and "(limit 2.0×)" in note and "limit 6.5" in note


def test_annotate_trial_logs_and_returns_false_when_the_note_cannot_be_written(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise optuna.exceptions.StorageInternalError("database is locked")

    monkeypatch.setattr(optuna_dashboard, "save_note", broken)
    trial = study.ask(DISTRIBUTIONS)
    with caplog.at_level(logging.WARNING, logger="search.review"):
        assert annotate_trial(study, trial, values=[1.0, 1.0]) is False
    assert f"could not write the dashboard note of trial {trial.number}" in caplog.text
    assert "database is locked" in caplog.text


@pytest.mark.postgres
def test_annotations_and_report_work_on_postgresql(postgres_url: str) -> None:
    study = make_review_study(postgres_url)
    counts = annotate_study(study)
    assert counts.notes_written == len(study.trials) + 1 and counts.figures_written == len(FIGURE_IDS)
    assert annotate_study(study).notes_written == 0
    assert "<h2>Prune reasons</h2>" in build_report(optuna.load_study(study_name=STUDY_NAME, storage=postgres_url))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("example.org", False),
    ],
)
def test_is_loopback_only_for_this_machine(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_annotate_storage_skips_studies_the_search_did_not_create(study: optuna.Study, storage_url: str) -> None:
    other = optuna.create_study(study_name="review-demo.baseline-seed0", storage=storage_url)
    done = annotate_storage(storage_url)
    assert list(done) == [STUDY_NAME]
    assert optuna_dashboard.get_note(other) == ""


def test_refresher_annotates_trials_that_finish_while_the_dashboard_serves(
    study: optuna.Study, storage_url: str
) -> None:
    refresher = Refresher(storage_url, [STUDY_NAME], interval_s=0.05)
    refresher.start()
    try:
        _wait_for(lambda: optuna_dashboard.get_note(study) != "", 30, "the refresher to annotate")
    finally:
        refresher.stop()
        refresher.join(timeout=10)
    assert not refresher.is_alive()
    assert _note_of(study, study.trials[0]).startswith("### Trial 0: ")


def test_read_baseline_prefers_the_baseline_of_the_study_files_trainer_seed(study: optuna.Study) -> None:
    attrs = dict(study.user_attrs)
    attrs["baseline:seed=1"] = {**attrs["baseline:seed=0"], "val_ppl": [1.0] * EPOCHS}
    attrs["koopman_search"]["spec"]["trainer"]["train"]["seed"] = 1
    baseline = read_baseline(attrs)
    assert baseline is not None and baseline.seed == 1 and baseline.at(10) == 1.0
    assert read_baseline(attrs, seed=0).at(10) == 477.2  # type: ignore[union-attr]
    assert read_baseline(attrs, seed=7) is None


# ---- report -------------------------------------------------------------------------------------------------

PLOTLY_HEADER = re.compile(r"\* plotly\.js v\d+\.\d+\.\d+")


def test_report_has_every_section_and_embeds_plotly_js_once(study: optuna.Study) -> None:
    text = build_report(study)
    headings = re.findall(r"<h2>([^<]+)</h2>", text)
    expected = [("Pareto front" if k == "best" else v) for k, v in SECTION_TITLES.items()]
    assert headings == expected
    assert len(PLOTLY_HEADER.findall(text)) == 1
    assert "<script src=" not in text and "<link " not in text  # nothing to fetch: opens offline
    assert text.count('class="plotly-graph-div"') >= 9  # pareto, 2 histories, 2 importances, 2 parallel, 3 curves


def test_report_tables_list_the_prune_reasons_and_failures(study: optuna.Study) -> None:
    text = build_report(study)
    section = text.split('<section id="pruned">', 1)[1].split("</section>", 1)[0]
    for trial in study.get_trials(states=(TrialState.PRUNED,)):
        reason = trial.user_attrs["prune_reason"]
        assert f'<td class="num">{trial.number}</td>' in section
        assert reason.replace(">", "&gt;") in section
    assert "CUDA out of memory" in section


def test_report_summary_counts_compute_spent_and_saved(study: optuna.Study) -> None:
    facts = [trial_facts(t) for t in study.get_trials()]
    spent = sum(f.epochs_run for f in facts) + EPOCHS
    warmup = sum(f.epochs_from_warmup for f in facts)
    pruned = sum(f.epochs_saved_by_pruning for f in facts)
    text = build_report(study)
    section = text.split('<section id="summary">', 1)[1].split("</section>", 1)[0]
    assert "6 complete, 2 pruned, 1 failed" in section
    assert f"<b>{spent} epochs</b>" in section
    assert f"<b>{warmup} epochs</b><span>saved by the shared warmup" in section
    assert f"<b>{pruned} epochs</b><span>saved by pruning" in section
    best = min(study.best_trials, key=lambda t: t.values[0])
    ratio = best.values[0] / BASELINE_VAL_PPL[-1]
    kpi = f"best val_ppl (trial {best.number}): {ratio:.2f} × the baseline's 477.2"
    assert f"<b>{best.values[0]:.5g}</b><span>{html.escape(kpi)}</span>" in section


def test_report_of_a_study_with_one_complete_trial_says_importances_need_more(storage_url: str) -> None:
    study = make_review_study(storage_url, plans=[PLANS[0], PLANS[3]])
    text = build_report(study)
    section = text.split('<section id="importances">', 1)[1].split("</section>", 1)[0]
    assert "Not enough trials: parameter importances need at least 2 complete trials, and this study has 1." in section
    assert "Pareto front" in text


def test_report_of_a_study_without_trials_explains_each_empty_section(tmp_path: Path) -> None:
    study = make_review_study(f"sqlite:///{tmp_path / 'empty.db'}", plans=[])
    text = build_report(study)
    assert "No trial has completed yet" in text and "No trial was pruned." in text
    assert len(PLOTLY_HEADER.findall(text)) == 1


def test_report_of_a_single_objective_study_shows_the_best_trial(tmp_path: Path) -> None:
    study = make_review_study(f"sqlite:///{tmp_path / 'one.db'}", objectives=["val_ppl"])
    text = build_report(study)
    headings = re.findall(r"<h2>([^<]+)</h2>", text)
    assert headings == list(SECTION_TITLES.values())  # "Best trial", not "Pareto front"
    best = study.best_trial
    section = text.split('<section id="best">', 1)[1].split("</section>", 1)[0]
    assert f'<td class="num">{best.number}</td>' in section and f"{best.value:.5g}" in section
    assert "Optimization history: val_ppl" in text


def test_best_config_is_toml_with_the_trainer_config_tables(study: optuna.Study) -> None:
    from search.review.summary import best_trials

    best = best_trials(study)[0]
    text = params_toml(study, best, ["val_ppl", "val_koopman_nre"])
    parsed = tomllib.loads(text)
    assert parsed["koopman"] == {
        "weight_max": best.params["koopman_weight_max"],
        "start_epoch": best.params["koopman_start_epoch"],
        "fallback_threshold": best.params["fallback_threshold"],
        "schedule": best.params["schedule"],
        "dim": best.params["koopman_dim"],
    }
    assert f"# Best trial {best.number}" in text


def test_report_exports_the_best_trials_full_trainer_config(study: optuna.Study) -> None:
    from search.review.summary import best_trials

    best = best_trials(study)[0]
    text = build_report(study)
    section = text.split('<section id="config">', 1)[1].split("</section>", 1)[0]
    toml_text = html.unescape(section.split("<pre>", 1)[1].split("</pre>", 1)[0])
    config = tomllib.loads(toml_text)
    assert config["koopman"]["weight_max"] == best.params["koopman_weight_max"]
    assert config["koopman"]["schedule"] == best.params["schedule"]
    assert config["train"]["epochs"] == EPOCHS  # the rest comes from the stored study file


def test_report_uses_the_given_best_config_renderer(study: optuna.Study) -> None:
    text = build_report(study, best_config=lambda s: f"# exported from {s.study_name}\n[koopman]\ndim = 128\n")
    assert f"# exported from {STUDY_NAME}" in text


def test_write_report_replaces_the_file_in_one_step(study: optuna.Study, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("old")
    write_report(study, out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "review-demo.db"]


# ---- the commands -------------------------------------------------------------------------------------------


def test_report_command_writes_the_file(study: optuna.Study, storage_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out.html"
    code = main(["report", "--study-name", STUDY_NAME, "--storage", storage_url, "--out", str(out)])
    assert code == 0
    assert out.stat().st_size > 1_000_000 and "<h2>Pareto front</h2>" in out.read_text(encoding="utf-8")


def test_report_command_reads_name_and_storage_from_the_study_file(study: optuna.Study, tmp_path: Path) -> None:
    # the study file's default storage is <its folder>/<name>.db, where the fixture put the study
    study_file = tmp_path / "review.toml"
    study_file.write_text(f'[study]\nname = "{STUDY_NAME}"\n\n[trainer.train]\nepochs = {EPOCHS}\n')
    out = tmp_path / "from-file.html"
    assert main(["report", str(study_file), "--out", str(out)]) == 0
    assert out.is_file()


def test_report_command_takes_storage_from_the_environment(
    study: optuna.Study, storage_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTUNA_STORAGE", storage_url)
    out = tmp_path / "env.html"
    assert main(["report", "--study-name", STUDY_NAME, "--out", str(out)]) == 0
    assert out.is_file()


def test_report_command_with_out_in_a_missing_directory_exits_2_naming_it(
    study: optuna.Study, storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nope" / "report.html"
    code = main(["report", "--study-name", STUDY_NAME, "--storage", storage_url, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "koopman-search report: error: --out must be in an existing directory" in err
    assert str(tmp_path / "nope") in err
    assert not out.parent.exists()


def test_report_command_with_a_missing_study_exits_1_listing_the_studies(
    study: optuna.Study, storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    code = main(["report", "--study-name", "no-such-study", "--storage", storage_url, "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "no study named 'no-such-study'" in err and f"studies there: {STUDY_NAME}" in err
    assert not out.exists()


def test_report_command_with_a_missing_sqlite_file_exits_1_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "missing.db"
    code = main(["report", "--study-name", "x", "--storage", f"sqlite:///{db}", "--out", str(tmp_path / "r.html")])
    assert code == 1
    assert "storage file must exist" in capsys.readouterr().err
    assert not db.exists()


def test_dashboard_command_without_a_storage_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    assert main(["dashboard"]) == 2
    assert "a storage is required" in capsys.readouterr().err


def test_dashboard_command_with_a_missing_study_exits_1_before_serving(
    study: optuna.Study, storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dashboard", "--storage", storage_url, "--study-name", "nope", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "no study named 'nope'" in err and f"studies there: {STUDY_NAME}" in err
    assert optuna_dashboard.get_note(study) == ""  # nothing annotated either


def test_dashboard_command_on_a_busy_port_warns_about_the_open_host_and_exits_2(
    study: optuna.Study, storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["dashboard", "--storage", storage_url, "--host", "0.0.0.0", "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert "reachable from other machines" in err
    assert f"cannot listen on 0.0.0.0:{port}" in err
    assert optuna_dashboard.get_note(study).startswith("## ")  # annotated before trying to serve


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "docker-stop"])
def test_dashboard_command_serves_the_api_until_stopped(
    study: optuna.Study, storage_url: str, stop: signal.Signals
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "dashboard", "--storage", storage_url, "--port", str(port)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    studies: list[Any] = []

    def listed() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                studies[:] = json.load(response)["study_summaries"]
            return True
        except OSError:
            return proc.poll() is not None

    try:
        _wait_for(listed, 60, "the dashboard command to answer")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert [s["study_name"] for s in studies] == [STUDY_NAME]
    finally:
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"optuna-dashboard at http://127.0.0.1:{port}/dashboard" in err
    assert "Traceback" not in err
