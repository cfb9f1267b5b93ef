"""Dashboard annotations: notes and figures through optuna-dashboard's API, and the refresher."""

from __future__ import annotations

import logging
from typing import Any

import optuna
import optuna_dashboard
import pytest
from optuna.trial import TrialState

from koopman_search.search.pruning.rules import PruneRules
from koopman_search.search.review import (
    FIGURE_IDS,
    annotate_storage,
    annotate_study,
    annotate_trial,
    build_report,
    is_loopback,
)
from koopman_search.search.review.dashboard import Refresher
from koopman_search.search.review.notes import CELL_PAD
from koopman_search.search.storage.layout import ROLE_ATTR, records_to_columns
from koopman_search.search.studyfile.spec import spec_from_dict
from tests.search.review.synthetic import (
    BASELINE_VAL_PPL,
    DISTRIBUTIONS,
    EPOCHS,
    PLANS,
    STUDY_NAME,
    _trial,
    make_review_study,
    plan_records,
    store_trial,
    study_file_values,
    wait_for,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


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
    assert study.metric_names == ["val_ppl", "val_linear_nre"]  # the default objectives


def test_annotate_study_twice_writes_nothing_new(study: optuna.Study) -> None:
    annotate_study(study)
    again = annotate_study(study)
    assert again.notes_written == 0 and again.figures_written == 0
    assert again.notes_unchanged == len(study.trials) + 1


def test_with_an_artifact_store_each_trial_note_opens_with_its_curves_image_made_once(
    study: optuna.Study, tmp_path: Any
) -> None:
    from optuna.artifacts import FileSystemArtifactStore

    store_dir = tmp_path / "artifacts"
    store_dir.mkdir()
    store = FileSystemArtifactStore(str(store_dir))
    annotate_study(study, store)
    with_records = [t for t in study.get_trials() if t.state != TrialState.FAIL]
    images = sorted(store_dir.iterdir())
    assert len(images) == len(with_records)  # one SVG per trial with epochs, none for the failed one
    assert all(p.read_bytes().lstrip().startswith(b"<?xml") and b"<svg" in p.read_bytes() for p in images)
    for trial in with_records:
        heading, blank, image = _note_of(study, trial).splitlines()[:3]
        assert heading.startswith(f"### Trial {trial.number}: ") and blank == ""
        assert image.startswith(f"![Trial {trial.number}: val perplexity, losses and linearity per epoch]")
        artifact = image.rsplit("/", 1)[1].rstrip(")")
        assert image.endswith(f"(/artifacts/{study._study_id}/{artifact})") and (store_dir / artifact).is_file()
    failed = _trial(study, TrialState.FAIL)
    assert "![" not in _note_of(study, failed)
    again = annotate_study(study, store)
    assert again.notes_written == 0 and sorted(store_dir.iterdir()) == images  # nothing drawn or stored again


def test_a_broken_artifact_store_leaves_the_note_without_its_image(
    study: optuna.Study, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def write(self, artifact_id: str, content: Any) -> None:
            raise OSError("disk full")

    trial = _trial(study, TrialState.COMPLETE)
    with caplog.at_level(logging.WARNING):
        assert annotate_trial(study, trial, artifact_store=Broken())
    note = _note_of(study, trial)
    assert note.startswith(f"### Trial {trial.number}: ") and "![" not in note
    assert f"could not make the curves image of trial {trial.number}" in caplog.text


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
    note = optuna_dashboard.get_note(trial).replace(CELL_PAD, "")  # the cells' padding (test_notes.py)
    assert "| 250.0 |" in note and "(limit 2.0×)" in note and "limit 6.5" in note


def test_annotate_trial_logs_and_returns_false_when_the_note_cannot_be_written(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise optuna.exceptions.StorageInternalError("database is locked")

    monkeypatch.setattr(optuna_dashboard, "save_note", broken)
    trial = study.ask(DISTRIBUTIONS)
    with caplog.at_level(logging.WARNING, logger="koopman_search.search.review"):
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
        wait_for(lambda: optuna_dashboard.get_note(study) != "", 30, "the refresher to annotate")
    finally:
        refresher.stop()
        refresher.join(timeout=10)
    assert not refresher.is_alive()
    assert _note_of(study, study.trials[0]).startswith("### Trial 0: ")


def test_annotate_study_notes_its_baseline_companion_as_such(study: optuna.Study, storage_url: str) -> None:
    companion = optuna.create_study(study_name=f"{STUDY_NAME}.baseline-seed0", storage=storage_url)
    companion.set_user_attr(ROLE_ATTR, f"baseline of study {STUDY_NAME}")
    annotate_study(study)
    note = optuna_dashboard.get_note(companion)
    assert note.startswith(f"## Baseline companion of study {STUDY_NAME}\n\nNot a search: ")
    assert "review that study" in note
    assert annotate_study(study).notes_written == 0  # idempotent, the companion's note included


def test_the_study_note_says_the_stock_importance_is_noise_under_ten_complete_trials(study: optuna.Study) -> None:
    annotate_study(study)
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    note = optuna_dashboard._note.get_note_from_system_attrs(system_attrs, None)["body"]
    complete = len(study.get_trials(states=(TrialState.COMPLETE,)))
    assert complete < 10
    assert f"until 10 trials are complete ({complete} so far)" in note


def test_status_data_and_the_study_note_say_what_the_study_found(study: optuna.Study) -> None:
    from koopman_search.search.review.status import status_data

    data = status_data(study)
    assert data["noise"].startswith("val_ppl of the 6 complete trials spans ")
    assert "0.8% (two standard errors over its batches)" in data["noise"]  # VAL_LOSS_SE = 0.004
    assert data["against_baseline"].startswith("the front's ")
    assert (
        "val_linear_nre " in data["against_baseline"] and "the baseline's at the same epoch" in data["against_baseline"]
    )
    annotate_study(study)
    note = optuna_dashboard.get_note(study).replace("\\", "")  # the note escapes Markdown's _ and *
    assert f"- {data['noise']}." in note and f"- {data['against_baseline']}." in note
