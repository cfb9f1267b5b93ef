"""Trial notes: the markdown optuna-dashboard shows beside each trial."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from koopman_search.search.review import (
    read_baseline,
    read_rules,
    trial_facts,
    trial_note,
)
from koopman_search.search.review.notes import CELL_PAD
from koopman_search.search.storage import layout
from tests.search.review.synthetic import (
    BASELINE_VAL_PPL,
    _facts,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- notes --------------------------------------------------------------------------------------------------


def test_note_of_pruned_trial_gives_reason_epoch_and_baseline_ratio(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.PRUNED, "original settings")
    note = trial_note(
        facts,
        ["val_ppl", "val_koopman_nre"],
        read_baseline(layout.study_attrs(study)),
        read_rules(layout.study_attrs(study)),
    )
    epoch = facts.pruned_epoch
    assert f"### Trial {facts.number}: pruned at epoch {epoch}" in note
    assert f"**Pruned:** total\\_loss {facts.prune_reason.split(' ', 1)[1]}" in note
    ppl = facts.metric("val_ppl")[-1]
    ratio = ppl / BASELINE_VAL_PPL[epoch - 1]
    plain = note.replace(CELL_PAD, "")  # the cells' padding (see test_note_tables_pad_every_cell_but_the_first)
    assert f"| val perplexity | {ppl:.5g} | {BASELINE_VAL_PPL[epoch - 1]:.5g} | {ratio:.3f}× (limit 1.3×) |" in plain
    assert f"{facts.epochs_saved_by_pruning} saved by the prune rules" in note
    assert "3 taken from the baseline's shared warmup" in note


def test_note_of_complete_trial_gives_objective_values_and_params(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.COMPLETE, "hand-tuned 2")
    note = trial_note(
        facts,
        ["val_ppl", "val_koopman_nre"],
        read_baseline(layout.study_attrs(study)),
        read_rules(layout.study_attrs(study)),
    )
    assert "hand-tuned 2" in note
    assert f"**Result:** val\\_ppl = {facts.values[0]:.5g}, val\\_koopman\\_nre = {facts.values[1]:.5g}" in note
    header = "| koopman\\_weight\\_max | koopman\\_start\\_epoch | fallback\\_threshold | schedule | koopman\\_dim |"
    plain = note.replace(CELL_PAD, "")
    assert f"{header}\n|---|---|---|---|---|\n| 0.1 | 5 | 7.0 | exponential | 128 |" in plain
    assert "| at epoch 10 |" in plain and "saved by the" not in note


def test_note_tables_pad_every_cell_but_the_first(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.COMPLETE, "hand-tuned 2")
    note = trial_note(
        facts, ["val_ppl"], read_baseline(layout.study_attrs(study)), read_rules(layout.study_attrs(study))
    )
    rows = [line for line in note.splitlines() if line.startswith("| ")]
    assert len(rows) >= 6
    for row in rows:
        first, *rest = row[2:-2].split(" | ")
        assert not first.startswith(CELL_PAD) and rest and all(c.startswith(CELL_PAD) for c in rest), row


def test_note_of_val_ppl_pruned_trial_says_the_ratio_is_over(study: optuna.Study) -> None:
    pruned = [t for t in study.get_trials(states=(TrialState.PRUNED,)) if "val_ppl" in t.user_attrs["prune_reason"]]
    assert len(pruned) == 1
    note = trial_note(
        trial_facts(pruned[0]),
        ["val_ppl", "val_koopman_nre"],
        read_baseline(layout.study_attrs(study)),
        read_rules(layout.study_attrs(study)),
    )
    assert "(limit 1.3×, over)" in note


def test_note_of_failed_trial_gives_the_error(study: optuna.Study) -> None:
    facts = _facts(study, TrialState.FAIL)
    note = trial_note(facts, ["val_ppl", "val_koopman_nre"], None, read_rules(layout.study_attrs(study)))
    assert "**Failed:** CUDA out of memory at epoch 5" in note
    assert "No epoch records were stored for this trial." in note


def test_note_of_a_trial_the_asha_pruner_stopped_names_its_rungs_and_ranks(study: optuna.Study) -> None:
    from dataclasses import replace

    facts = _facts(study, TrialState.PRUNED, "original settings")
    reason = "asha: rung 2 (Koopman epoch 3, epoch 6): rank 4 of 7 on (val_ppl, val_koopman_nre), keeps top 2"
    rungs = [
        {"rung": 1, "koopman_epoch": 1, "epoch": 4, "rank": 2, "of": 5, "keep": 2},
        {"rung": 2, "koopman_epoch": 3, "epoch": 6, "rank": 4, "of": 7, "keep": 2},
    ]
    attrs = {**facts.user_attrs, "prune_reason": reason, "pruned_by": "asha", "asha_rungs": rungs}
    facts = replace(facts, user_attrs=attrs)
    assert facts.pruned_by == "asha" and facts.epochs_saved_by_rules == 0
    assert facts.epochs_saved_by_pruner == facts.epochs_saved_by_pruning > 0
    note = trial_note(
        facts,
        ["val_ppl", "val_koopman_nre"],
        read_baseline(layout.study_attrs(study)),
        read_rules(layout.study_attrs(study)),
    )
    assert "**Pruned:** asha: rung 2 (Koopman epoch 3, epoch 6): rank 4 of 7" in note
    assert (
        "**asha rungs:** rung 1 (epoch 4): rank 2 of 5, kept (top 2 continue); "
        "rung 2 (epoch 6): rank 4 of 7, pruned (top 2 continue)." in note
    )
    assert f"{facts.epochs_saved_by_pruning} saved by the asha pruner" in note
