"""What the review reads from storage: the synthetic study itself, rules, baselines and trial facts."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from koopman_search.search.review import (
    read_baseline,
    read_rules,
)
from koopman_search.search.storage import layout
from tests.search.review.synthetic import (
    EPOCHS,
    _facts,
    _trial,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_synthetic_study_has_the_trial_states_the_review_must_show(study: optuna.Study) -> None:
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 6
    assert states.count(TrialState.PRUNED) == 2
    assert states.count(TrialState.FAIL) == 1
    original = _trial(study, TrialState.PRUNED, "original settings")
    assert original.user_attrs["prune_reason"].startswith("total_loss ")
    assert "> 7.0 at epoch" in original.user_attrs["prune_reason"]


# ---- stored facts -------------------------------------------------------------------------------------------


def test_read_rules_and_baseline_from_study_attrs(study: optuna.Study) -> None:
    rules = read_rules(layout.study_attrs(study))
    assert (rules.total_loss_max, rules.val_ppl_ratio_max) == (7.0, 1.3)
    baseline = read_baseline(layout.study_attrs(study))
    assert baseline is not None and baseline.seed == 0 and baseline.state == "complete"
    assert baseline.at(10) == 477.2 and baseline.at(11) is None and baseline.at(0) is None


def test_epochs_saved_by_pruning_is_epochs_minus_run_minus_warmup(study: optuna.Study) -> None:
    pruned = _facts(study, TrialState.PRUNED, "original settings")
    assert pruned.epochs_from_warmup == 3
    assert pruned.epochs_saved_by_pruning == EPOCHS - pruned.epochs_run - 3
    assert pruned.epochs_saved_by_pruning > 0
    complete = _facts(study, TrialState.COMPLETE, "hand-tuned 1")
    assert complete.epochs_saved_by_pruning == 0 and complete.epochs_run == EPOCHS - 4


def test_read_baseline_prefers_the_baseline_of_the_study_files_trainer_seed(study: optuna.Study) -> None:
    attrs = layout.study_attrs(study)
    attrs["baseline:seed=1"] = {**attrs["baseline:seed=0"], "val_ppl": [1.0] * EPOCHS}
    attrs["koopman_search"] = {**attrs["koopman_search"], "trainer_seed": 1}
    baseline = read_baseline(attrs)
    assert baseline is not None and baseline.seed == 1 and baseline.at(10) == 1.0
    # a study stored before version 2 names the seed inside its whole definition
    old = {**attrs, "koopman_search": {"version": 1, "spec": {"trainer": {"train": {"seed": 1}}}}}
    assert read_baseline(old).seed == 1  # type: ignore[union-attr]
    assert read_baseline(attrs, seed=0).at(10) == 477.2  # type: ignore[union-attr]
    assert read_baseline(attrs, seed=7) is None


def test_an_interrupted_attempt_is_counted_apart_from_the_failed_ones() -> None:
    from koopman_search.search.review.stored import TrialFacts
    from koopman_search.search.review.summary import summarize

    def failed(number: int, reason: str) -> TrialFacts:
        return TrialFacts(number, number, "FAIL", {}, None, None, {layout.FAIL_REASON: reason})

    summary = summarize(
        [
            failed(0, "interrupted after epoch 2; queued to resume from its checkpoint"),
            failed(1, "CUDA out of memory"),
            TrialFacts(2, 2, "COMPLETE", {}, (1.0,), None),
        ],
        None,
    )
    assert summary.states["FAIL"] == 1 and summary.states["INTERRUPTED"] == 1
    assert summary.states_text() == "1 complete, 1 failed, 1 interrupted (queued to resume)"
