"""The study as a queue: the budget, claiming a trial, and queuing a trial again."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from koopman_search.search.cli import main
from koopman_search.search.engine.study import (
    OUTCOME_ATTRS,
    claim_waiting_trial,
    create_or_load_study,
    enqueue_retry,
    ensure_budget,
    next_due,
)
from koopman_search.search.storage import layout
from koopman_search.search.storage.database import open_storage
from koopman_search.search.studyfile.spec import load_spec
from tests.search.study_files import write_study as write_tiny_study
from tests.search.study_files import write_worker_study as write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- a worker that dies right after claiming a trial ----------------------------------------------------


def test_a_trial_claimed_by_a_worker_that_dies_before_its_first_heartbeat_is_retried(tmp_path: Path) -> None:
    # claiming records a heartbeat first: a RUNNING trial without any heartbeat would never be found stale
    from koopman_search.search.storage.database import GRACE_FACTOR, fail_stale_trials

    study_file = write_study(tmp_path, f"sqlite:///{tmp_path / 'w.db'}", n_trials=1)
    assert main(["create", str(study_file)]) == 0
    study = optuna.load_study(
        study_name="w", storage=open_storage(load_spec(study_file).storage_url, heartbeat_interval=1)
    )
    claimed = claim_waiting_trial(study)  # ... and its worker dies here, before any Heartbeat thread
    assert claimed is not None
    time.sleep(GRACE_FACTOR * 1 + 1.5)
    fail_stale_trials(study)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs["failed_trial"] == claimed.number


def test_claiming_takes_the_oldest_waiting_trial_and_none_when_the_queue_is_empty(tmp_path: Path) -> None:
    spec = load_spec(write_tiny_study(tmp_path, n_trials=2, storage=f"sqlite:///{tmp_path / 'q.db'}"))
    study, created = create_or_load_study(spec, open_storage(spec.storage_url, heartbeat=False))
    assert created
    assert ensure_budget(study, spec) == 2
    first, second = claim_waiting_trial(study), claim_waiting_trial(study)
    assert first is not None and second is not None
    assert (first.number, second.number) == (0, 1)
    assert claim_waiting_trial(study) is None
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.RUNNING]


def test_the_budget_is_topped_up_once_and_retries_do_not_count(tmp_path: Path) -> None:
    spec = load_spec(write_tiny_study(tmp_path, n_trials=2, storage=f"sqlite:///{tmp_path / 'b.db'}"))
    study, _ = create_or_load_study(spec, open_storage(spec.storage_url, heartbeat=False))
    assert ensure_budget(study, spec) == 2
    assert ensure_budget(study, spec) == 0
    trial = claim_waiting_trial(study)
    assert trial is not None
    study.tell(trial, state=TrialState.FAIL)
    enqueue_retry(study, study.get_trials()[trial.number])
    assert ensure_budget(study, spec) == 0  # the retry stands in for its attempt
    assert ensure_budget(study, spec, n_trials=3) == 1


def test_a_retry_keeps_params_and_checkpoint_but_not_the_outcome_of_its_attempt() -> None:
    study = optuna.create_study()
    user_attrs, system_attrs = layout.split_trial_attrs(
        {
            layout.CHECKPOINT: layout.checkpoint_pointer(2, "a1"),
            layout.LABEL: "hand-tuned 1",
            layout.FAIL_REASON: "interrupted",
            layout.PRUNE_REASON: "x",
            layout.PRUNED_EPOCH: 2,
        }
    )
    attempt = optuna.trial.create_trial(
        state=TrialState.FAIL,
        params={"koopman_weight_max": 0.1},
        distributions={"koopman_weight_max": FloatDistribution(0.01, 0.5)},
        user_attrs=user_attrs,
        system_attrs={"artifacts:a1": "{}", **system_attrs},
    )
    study.add_trial(attempt)
    enqueue_retry(study, study.get_trials()[0])
    retry = study.get_trials()[1]
    assert retry.state == TrialState.WAITING
    assert retry.params == {"koopman_weight_max": 0.1}
    assert retry.user_attrs == {layout.LABEL: "hand-tuned 1"}  # the checkpoint is a system attr
    assert layout.trial_attrs(retry) == {
        layout.CHECKPOINT: {"epoch": 2, "artifact_id": "a1"},
        layout.LABEL: "hand-tuned 1",
    }
    assert not set(OUTCOME_ATTRS) & set(layout.trial_attrs(retry))
    assert layout.is_retry(retry) and layout.retry_of(retry) == 0
    assert not any(k.startswith("artifacts:") for k in retry.system_attrs)
    enqueue_retry(study, study.get_trials()[1])
    assert study.get_trials()[2].system_attrs[layout.RETRY_HISTORY] == [0, 1]


def test_the_study_definition_is_a_system_attr_and_the_user_attr_a_short_summary(tmp_path: Path) -> None:
    """The dashboard's "Study User Attributes" and `optuna studies` show user attrs as raw JSON: the whole
    definition lives in a system attr, and the user attr says what a reader needs at a glance."""
    from koopman_search.search.review.export import stored_spec

    spec = load_spec(write_tiny_study(tmp_path))
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study, created = create_or_load_study(spec, storage)
    assert created
    meta = study.user_attrs[layout.SPEC_ATTR]
    assert set(meta) == {"version", "definition", "pruner", "trainer_seed", "objectives", "rules"}
    assert meta["version"] == 2 and meta["trainer_seed"] == spec.trainer.train.seed
    assert len(str(meta)) < 400
    system = storage.get_study_system_attrs(study._study_id)
    assert system[layout.SPEC_DEFINITION_ATTR] == spec.to_dict()
    assert stored_spec(study).to_dict() == spec.to_dict()


def test_a_study_stored_with_the_whole_definition_in_its_user_attr_still_reads(tmp_path: Path) -> None:
    from koopman_search.search.review.export import stored_spec

    spec = load_spec(write_tiny_study(tmp_path))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'old.db'}", study_name=spec.name)
    old = {"version": 1, "spec": spec.to_dict(), "objectives": [o.to_dict() for o in spec.objectives]}
    study.set_user_attr(layout.SPEC_ATTR, old)
    assert stored_spec(study).to_dict() == spec.to_dict()


def test_raising_the_budget_counts_only_the_unlabelled_entries_optuna_added(tmp_path: Path) -> None:
    path = write_tiny_study(tmp_path, n_trials=3, storage=f"sqlite:///{tmp_path / 'u.db'}")
    entries = "".join(
        f"\n[[enqueue]]\nkoopman_weight_max = {w}\nkoopman_start_epoch = 1\nfallback_threshold = 8.0\n"
        'schedule = "linear"\nkoopman_dim = 8\n'
        for w in (0.1, 0.2)
    )
    path.write_text(path.read_text() + entries)  # two unlabelled entries
    spec = load_spec(path)
    study, _ = create_or_load_study(spec, open_storage(spec.storage_url, heartbeat=False))
    assert ensure_budget(study, spec, n_trials=1) == 1  # the first entry (a launch with --n-trials 1)
    # raised to the file's 3: Optuna skips the first entry (its trial exists), adds the second and one empty
    assert ensure_budget(study, spec) == 2
    assert len(study.get_trials()) == 3


def test_queuing_a_large_budget_says_how_far_it_got(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from koopman_search.search.engine import study as study_module

    monkeypatch.setattr(study_module, "PROGRESS_EVERY", 0.0)  # a line per trial instead of one per 5 s
    spec = load_spec(write_tiny_study(tmp_path, n_trials=5))
    study = create_or_load_study(spec, open_storage(f"sqlite:///{tmp_path / 's.db'}"))[0]
    with caplog.at_level("INFO", logger="koopman_search.search"):
        assert ensure_budget(study, spec) == 5
    lines = [r.getMessage() for r in caplog.records if "empty trial(s) so far" in r.getMessage()]
    assert lines[0].endswith("queued 1 of 5 empty trial(s) so far") and lines[-1].endswith(
        "queued 5 of 5 empty trial(s) so far"
    )


def test_a_retry_queued_with_a_pause_is_not_claimed_before_it_is_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from koopman_search.search.engine import study as study_module

    spec = load_spec(write_tiny_study(tmp_path, n_trials=1))
    study = create_or_load_study(spec, open_storage(f"sqlite:///{tmp_path / 's.db'}"))[0]
    ensure_budget(study, spec)
    first = claim_waiting_trial(study)
    assert first is not None
    study.tell(first, state=TrialState.FAIL)
    enqueue_retry(study, study.get_trials()[0], pause=30.0)  # as after a full disk
    assert next_due(study) == pytest.approx(30.0, abs=2.0)
    assert claim_waiting_trial(study) is None  # queued, but not due
    now = time.time()
    monkeypatch.setattr(study_module.time, "time", lambda: now + 31.0)
    retry = claim_waiting_trial(study)
    assert retry is not None and retry.number == 1
    assert next_due(study) is None


def test_a_worker_waits_out_an_unwritable_artifact_store_before_its_next_trial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from koopman_search.search.workers import loop

    problems = iter(["No space left on device", "Read-only file system", None])
    monkeypatch.setattr(loop, "store_problem", lambda _location: next(problems))
    pauses: list[float] = []
    assert not loop._wait_out_the_environment(str(tmp_path), lambda s: pauses.append(s) or False, 1, probes=3)
    assert pauses == [2.0, 4.0, 8.0]  # waited, probed, waited longer, until the store took a write

    pauses.clear()
    monkeypatch.setattr(loop, "store_problem", lambda _location: "No space left on device")  # for good
    assert not loop._wait_out_the_environment(str(tmp_path), lambda s: pauses.append(s) or False, 1, probes=2)
    assert pauses == [2.0, 4.0, 8.0]  # bounded: then the trials' own retries decide

    pauses.clear()
    assert loop._wait_out_the_environment(str(tmp_path), lambda s: pauses.append(s) or True, 1)  # stopped
    assert pauses == [2.0]


def test_the_artifact_store_probe_finds_a_store_that_cannot_be_written(tmp_path: Path) -> None:
    from koopman_search.search.storage.artifacts import store_problem

    assert store_problem(str(tmp_path / "new" / "artifacts")) is None  # made when missing
    (tmp_path / "file").write_text("", encoding="utf-8")
    assert store_problem(str(tmp_path / "file" / "artifacts")) is not None
    assert list((tmp_path / "new" / "artifacts").iterdir()) == []  # the probe leaves nothing
