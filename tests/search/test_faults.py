"""Faults a search must survive without losing a trial: database outages, full disks, bad checkpoints,
dying processes (docs/design.md, "Fault model").

Database outages are staged on a PostgreSQL cluster of the test's own (:mod:`tests.search.pg_cluster`),
never on the shared server. The studies are the tiny ones of :mod:`tests.search.study_files`.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import optuna_dashboard
import pytest
import torch
from optuna.trial import TrialState

from koopman_search.search.cli import main
from koopman_search.search.engine.baseline import baseline_config_hash, rerun_baseline
from koopman_search.search.engine.runner import TrialOutcome
from koopman_search.search.engine.study import ensure_budget
from koopman_search.search.errors import BaselineError
from koopman_search.search.settings import RuntimeSettings, configured
from koopman_search.search.storage import layout
from koopman_search.search.storage.database import open_storage
from koopman_search.search.storage.layout import trial_attrs
from koopman_search.search.studyfile.space import SearchSpace
from koopman_search.search.studyfile.spec import StudySpec, load_spec
from koopman_search.search.workers import run_worker
from koopman_search.trainer.checkpoint import read_checkpoint
from koopman_search.trainer.records import EpochRecord
from tests.search.pg_cluster import own_cluster
from tests.search.slow_model import STEP_SECONDS_ENV
from tests.search.study_files import interruptible, logging_restored, study_names, trials_of
from tests.search.study_files import write_worker_study as write_study
from tests.search.worker_processes import (
    Worker,
    open_study,
    originals,
    retries_of,
    running_with_checkpoint,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
OUTAGE_SECONDS = 20.0


@pytest.mark.slow
@pytest.mark.postgres
def test_a_database_outage_as_a_trial_draws_its_parameters_does_not_fail_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with own_cluster() as pg:
        study = write_study(tmp_path, pg.url, n_trials=2, epochs=2, start_epoch=1)
        with logging_restored():
            assert main(["create", str(study)]) == 0
        restarts = []
        draw = SearchSpace.suggest

        def suggest_in_an_outage(self: SearchSpace, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
            if not restarts:  # the database goes down just as the first trial asks the sampler
                restarts.append(pg.outage(OUTAGE_SECONDS))
            return draw(self, trial)

        monkeypatch.setattr(SearchSpace, "suggest", suggest_in_an_outage)
        with caplog.at_level(logging.WARNING, logger="koopman_search.search"):
            summary = run_worker(load_spec(study))
        restarts[0].join(timeout=60)
        assert pg.outages == 1
        assert [o.state for o in summary.outcomes] == ["COMPLETE", "COMPLETE"], summary.outcomes
        trials = trials_of(pg.url, "w")
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
        assert all(len(t.params) == 5 for t in trials)
        assert any(
            "draw the parameters of trial 0: database unreachable since" in r.getMessage() for r in caplog.records
        )


# ---- launch in one process: signals, the baseline, the sampler seed ------------------------------------------


def _launch(study: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "koopman_search.search.cli", "launch", str(study)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        preexec_fn=interruptible,
    )


def _wait_until(predicate: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"launch exited ({proc.returncode}) before {what}:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"launch did not end within {timeout} s of the signal:\n{err[-3000:]}")
    return proc.returncode, out, err


def _baseline_trials(url: str, name: str = "w") -> list[optuna.trial.FrozenTrial]:
    names = study_names(url)
    return trials_of(url, f"{name}.baseline-seed0") if f"{name}.baseline-seed0" in names else []


@pytest.fixture
def slow_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv(STEP_SECONDS_ENV, "0.05")
    return dict(os.environ)


@pytest.mark.slow
def test_ctrl_c_in_launchs_baseline_exits_130_without_a_traceback_and_the_dashboard_note_is_written(
    tmp_path: Path, slow_env: dict[str, str]
) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    study = write_study(tmp_path, url, n_trials=2, epochs=4, start_epoch=1, slow=True)
    proc = _launch(study, slow_env)
    _wait_until(
        lambda: any(t.state == TrialState.RUNNING and "checkpoint" in trial_attrs(t) for t in _baseline_trials(url)),
        proc,
        "the baseline's first epoch",
    )
    proc.send_signal(signal.SIGINT)
    code, _out, err = _finish(proc)
    assert code == 130, err
    assert "Traceback" not in err and "could not write the study's dashboard note" not in err, err
    assert "run `koopman-search launch" in err
    baseline = _baseline_trials(url)
    assert [t.state for t in baseline] == [TrialState.FAIL, TrialState.WAITING]  # handed back to resume
    main_study = optuna.load_study(study_name="w", storage=url)
    assert "no curve yet" in optuna_dashboard.get_note(main_study)  # the note of a study without a curve
    assert not [t for t in main_study.get_trials() if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_sigterm_stops_a_single_process_launch_after_its_epoch_and_hands_the_trial_back(
    tmp_path: Path, slow_env: dict[str, str]
) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    study = write_study(tmp_path, url, n_trials=2, epochs=4, start_epoch=1, slow=True)
    proc = _launch(study, slow_env)

    def trial_checkpointed() -> bool:
        if "w" not in study_names(url):
            return False
        return any(
            t.state == TrialState.RUNNING and trial_attrs(t).get("checkpoint", {}).get("epoch") == 2
            for t in trials_of(url, "w")
        )

    _wait_until(trial_checkpointed, proc, "a trial's epoch 2")
    proc.send_signal(signal.SIGTERM)
    code, _out, err = _finish(proc)
    assert code == 130, err
    assert "Traceback" not in err
    trials = trials_of(url, "w")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    [stopped] = [t for t in trials if t.state == TrialState.FAIL]
    assert "interrupted after epoch" in stopped.user_attrs["fail_reason"]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == stopped.number]
    assert retry.state == TrialState.WAITING and retry.params == stopped.params
    assert trial_attrs(retry)["checkpoint"]["epoch"] == trial_attrs(stopped)["records"]["epoch"][-1] >= 2


def test_each_launch_draws_other_first_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    study = write_study(tmp_path, url, n_trials=1, epochs=2, start_epoch=1)
    with logging_restored():
        assert main(["launch", str(study)]) == 0
        assert main(["launch", str(study), "--n-trials", "2"]) == 0
    first, second = (t for t in trials_of(url, "w") if t.state == TrialState.COMPLETE)
    assert first.params["koopman_weight_max"] != second.params["koopman_weight_max"]
    assert first.params["fallback_threshold"] != second.params["fallback_threshold"]


# ---- environment faults: a full disk, damaged checkpoints ------------------------------------------------------


@contextmanager
def small_disk(size: str = "8m") -> Iterator[Path]:
    """A real tmpfs of ``size``, mounted for the test (the tests run as root, as CI does)."""
    where = Path(tempfile.mkdtemp(prefix="ks-disk-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)
        shutil.rmtree(where, ignore_errors=True)


def _fill(disk: Path, leave: int = 64 * 1024) -> Path:
    """Fill ``disk`` up to ``leave`` free bytes with a ballast file, which the test may delete."""
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    ballast.write_bytes(b"\0" * max(0, free - leave))
    return ballast


def _tiny(tmp_path: Path, artifacts: Path, *, n_trials: int, epochs: int = 3) -> StudySpec:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = write_study(tmp_path, url, n_trials=n_trials, epochs=epochs, start_epoch=1)
    with logging_restored():
        assert main(["create", str(path)]) == 0
    return dataclasses.replace(load_spec(path), artifacts_dir=str(artifacts))


@pytest.mark.slow
def test_a_full_artifact_disk_fails_the_attempt_queues_it_again_and_the_budget_is_kept(tmp_path: Path) -> None:
    with small_disk() as disk:
        spec = _tiny(tmp_path, disk / "artifacts", n_trials=2)
        baseline_done = threading.Event()
        ballast: list[Path] = []

        def on_baseline_epoch(record: EpochRecord) -> None:
            if record.epoch == record.epochs:
                baseline_done.set()

        def on_trial_start(number: int) -> None:
            if number == 0 and not ballast:  # the disk is full as the first trial starts
                ballast.append(_fill(disk))

        def on_outcome(outcome: TrialOutcome) -> None:
            if outcome.requeued and ballast and ballast[0].exists():
                ballast[0].unlink()  # the operator frees the disk

        summary = run_worker(
            spec, on_trial_start=on_trial_start, on_outcome=on_outcome, on_baseline_epoch=on_baseline_epoch
        )
    assert baseline_done.is_set() and ballast
    first = summary.outcomes[0]
    assert first.requeued and not first.lost and "No space left on device" in (first.reason or "")
    assert summary.counted == 2 and summary.lost == []
    trials = trials_of(spec.storage_url, "w")
    originals = [t for t in trials if "failed_trial" not in t.system_attrs]
    assert len(originals) == 2  # the budget: the retry did not use up a trial
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert retry.user_attrs["env_failures"] == 1
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]


@pytest.mark.slow
def test_a_trial_its_environment_fails_too_often_is_lost_and_launch_says_so_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KOOPMAN_ENV_RETRY_MAX", "1")  # read by each command below
    with small_disk() as disk:
        path = write_study(tmp_path, f"sqlite:///{tmp_path / 'w.db'}", n_trials=1, epochs=2, start_epoch=1)
        monkeypatch.setenv("KOOPMAN_ARTIFACTS", str(disk / "artifacts"))
        with logging_restored():
            assert main(["create", str(path), "--artifacts", str(disk / "artifacts")]) == 0
            assert main(["launch", str(path)]) == 0  # the baseline and trial 0 ... then the disk fills
            _fill(disk)
            assert main(["launch", str(path), "--n-trials", "2"]) == 1
    err = capsys.readouterr().err
    # trial 2 is the retry of trial 1
    assert "koopman-search launch: error: 1 trial(s) lost to environment faults (trial 2)" in err
    trials = trials_of(f"sqlite:///{tmp_path / 'w.db'}", "w")
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL"]
    assert trials[2].system_attrs["failed_trial"] == 1 and trials[2].user_attrs["env_failures"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate newest", "remove both", "remove both, corrupt warmup"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before_then_the_warmup_then_epoch_0(
    tmp_path: Path, damage: str
) -> None:
    artifacts = tmp_path / "artifacts"
    spec = _tiny(tmp_path, artifacts, n_trials=1, epochs=4)
    stop = threading.Event()
    first = run_worker(spec, stop=stop, on_epoch=lambda _n, r: stop.set() if r.epoch == 3 else None)
    assert first.interrupted
    trials = trials_of(spec.storage_url, "w")
    pointer = trial_attrs(trials[0])["checkpoint"]
    assert pointer["epoch"] == 3 and pointer["previous"]["epoch"] == 2
    assert pointer["size"] == (artifacts / pointer["artifact_id"]).stat().st_size
    newest, before = artifacts / pointer["artifact_id"], artifacts / pointer["previous"]["artifact_id"]
    if damage == "truncate newest":
        newest.write_bytes(newest.read_bytes()[:1000])
    else:
        newest.unlink()
        before.unlink()
    if damage.endswith("corrupt warmup"):
        baseline = trials_of(spec.storage_url, "w.baseline-seed0")[0]
        warmup = artifacts / trial_attrs(baseline)["checkpoints"]["1"]
        shutil.copy(warmup, tmp_path / "warmup-before.pt")
        warmup.write_bytes(b"not a checkpoint" + warmup.read_bytes()[16:])

    second = run_worker(spec)
    [outcome] = second.outcomes
    assert outcome.state == "COMPLETE", outcome.reason
    retry = trials_of(spec.storage_url, "w")[1]
    assert trial_attrs(retry)["records"]["epoch"] == [1, 2, 3, 4]
    note = retry.user_attrs["resume_fallback"]
    if damage == "truncate newest":
        assert "is corrupt" in note and note.startswith("resumed from epoch 2")
        assert retry.user_attrs["epochs_resumed"] == 2
    elif damage == "remove both":
        assert "missing" in note and note.endswith("started from the baseline's warmup checkpoint of epoch 1")
        assert retry.user_attrs["epochs_from_warmup"] == 1 and "epochs_resumed" not in retry.user_attrs
    else:
        # rebuilt once, by rerunning the baseline's first epoch: the same computation, the same checkpoint
        assert "warmup checkpoint of epoch 1 cannot be used" in note and note.endswith("started from it rebuilt")
        assert retry.user_attrs["epochs_from_warmup"] == 1
        stored = layout.study_attrs(optuna.load_study(study_name="w", storage=spec.storage_url))["baseline:seed=0"]
        original = trial_attrs(baseline)["checkpoints"]["1"]
        rebuilt = stored["checkpoints"]["1"]
        assert rebuilt != original and stored["rebuilt"] == {"1": True}
        before, again = (read_checkpoint(p) for p in (tmp_path / "warmup-before.pt", artifacts / rebuilt))
        assert before["epoch"] == again["epoch"] == 1
        assert before["model"].keys() == again["model"].keys()
        assert all(torch.equal(before["model"][k], again["model"][k]) for k in before["model"])
        # not a second time: a later trial that finds the rebuilt one corrupt trains from epoch 0
        (artifacts / rebuilt).write_bytes(b"garbage")
        ensure_budget(optuna.load_study(study_name="w", storage=spec.storage_url), spec, 2)
        [later] = run_worker(spec).outcomes
        assert later.state == "COMPLETE" and later.epochs_from_warmup == 0
        third = trials_of(spec.storage_url, "w")[2]
        assert third.user_attrs["resume_fallback"].endswith("trained from epoch 0")


# ---- the baseline ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_diverged_baseline_fails_instead_of_completing_and_reruns_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import koopman_search.trainer.loop  # noqa: F401 - trainer.loop below
    from koopman_search import trainer

    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = write_study(tmp_path, url, n_trials=1, epochs=2, start_epoch=1)
    with logging_restored():
        assert main(["create", str(path)]) == 0
    monkeypatch.setattr(trainer.loop, "_ppl", lambda _loss: math.inf)  # every epoch's perplexity overflows
    with pytest.raises(BaselineError, match=r"the baseline diverged: val PPL inf at epoch 1"):
        run_worker(load_spec(path))
    assert [t.state for t in trials_of(url, "w.baseline-seed0")] == [TrialState.FAIL]
    main_study = optuna.load_study(study_name="w", storage=url)
    assert layout.study_attrs(main_study)["baseline:seed=0"]["state"] == "failed"
    assert [t.state for t in main_study.get_trials()] == [TrialState.WAITING]  # no trial touched

    monkeypatch.undo()
    assert rerun_baseline(load_spec(path), open_storage(url, heartbeat=False))
    summary = run_worker(load_spec(path))
    assert [o.state for o in summary.outcomes] == ["COMPLETE"]
    assert [t.state for t in trials_of(url, "w.baseline-seed0")] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.slow
@pytest.mark.parametrize(("faults", "allowed"), [(1, "3"), (2, "1")])
def test_a_baseline_failed_by_its_environment_is_run_again_from_its_checkpoint_a_bounded_number_of_times(
    faults: int, allowed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from koopman_search.search.engine import job

    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = write_study(tmp_path, url, n_trials=1, epochs=3, start_epoch=1)
    with logging_restored():
        assert main(["create", str(path)]) == 0
    monkeypatch.setenv("KOOPMAN_ENV_RETRY_MAX", allowed)
    monkeypatch.setattr(job, "ENV_RETRY_PAUSE_MAX", 0.0)  # no pause between attempts in a test
    save_epoch, failed = job.TrainingJob.save_epoch, []

    def disk_full_at_epoch_2(self: job.TrainingJob, trainer: Any, record: EpochRecord, *args: Any) -> Any:
        if record.epoch == 2 and len(failed) < faults and "baseline" in self._what:
            failed.append(record.epoch)
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_epoch(self, trainer, record, *args)

    monkeypatch.setattr(job.TrainingJob, "save_epoch", disk_full_at_epoch_2)
    with configured(RuntimeSettings.from_environment()):
        if faults > int(allowed):
            with pytest.raises(BaselineError, match="No space left on device"):
                run_worker(load_spec(path))
            states = [t.state for t in trials_of(url, "w.baseline-seed0")]
            assert states == [TrialState.FAIL, TrialState.FAIL]  # one retry allowed, then a failed baseline
            return
        summary = run_worker(load_spec(path))
    assert [o.state for o in summary.outcomes] == ["COMPLETE"]
    runs = trials_of(url, "w.baseline-seed0")
    assert [t.state for t in runs] == [TrialState.FAIL, TrialState.COMPLETE]
    assert runs[1].user_attrs["env_failures"] == 1
    assert trial_attrs(runs[1])["records"]["epoch"] == [1, 2, 3]  # epoch 1 kept, 2 and 3 trained by the retry


@pytest.mark.slow
def test_an_edited_trainer_config_gets_a_baseline_of_its_own(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = write_study(tmp_path, url, n_trials=1, epochs=2, start_epoch=1)
    with logging_restored():
        assert main(["launch", str(path)]) == 0
        first = load_spec(path)
        path.write_text(path.read_text().replace("lr = 3e-3", "lr = 1e-3"))
        second = load_spec(path)
        assert baseline_config_hash(first) != baseline_config_hash(second)
        assert main(["launch", str(path), "--n-trials", "2"]) == 2  # refused: the file changed
        assert main(["launch", str(path), "--n-trials", "2", "--redefine"]) == 0  # continued under the new one
    names = study_names(url)
    assert names == ["w", "w.baseline-seed0", f"w.baseline-seed0-{baseline_config_hash(second)}"]
    (old,) = trials_of(url, "w.baseline-seed0")
    (new,) = trials_of(url, names[2])
    assert old.state == new.state == TrialState.COMPLETE and old.value != new.value
    stored = layout.study_attrs(optuna.load_study(study_name="w", storage=url))["baseline:seed=0"]
    assert stored["config_hash"] == baseline_config_hash(second)
    assert stored["val_ppl"][-1] == pytest.approx(new.value, rel=1e-5)


@pytest.mark.parametrize("fault", ["device", "factory"])
def test_a_machine_that_cannot_run_the_study_stops_before_the_baseline_or_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: str
) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = write_study(tmp_path, url, n_trials=1, epochs=2, start_epoch=1)
    args = ["launch", str(path)]
    if fault == "device":
        args += ["--device", "cuda:7"]
    else:
        factory = '[trainer.model]\nfactory = "no_such_module:build"'
        path.write_text(path.read_text().replace("[trainer.model]", factory))
    with logging_restored():
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    [line] = [x for x in err.splitlines() if x.startswith("koopman-search launch: error:")]
    assert ("cuda:7" in line) if fault == "device" else ("no_such_module" in line)
    assert "w.baseline-seed0" not in study_names(url)
    assert [t.state for t in trials_of(url, "w")] == [TrialState.WAITING]


# ---- the supervisor: a process that dies in a trial ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_a_killed_slots_trial_is_queued_again_at_once_and_the_command_ends_with_nothing_running(
    tmp_path: Path,
    postgres_url: str,
    worker_env: dict[str, str],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    worker_env["KOOPMAN_HEARTBEAT_INTERVAL"] = "30"  # no stale heartbeat within the test: the supervisor acts
    study = write_study(tmp_path, postgres_url, n_trials=4, epochs=4, start_epoch=1, slow=True)
    with logging_restored():
        assert main(["create", str(study)]) == 0
    supervisor = Worker(study, ["--workers", "2", "--max-trials", "4"], worker_env, "supervisor", processes)
    victim = wait_for(
        running_with_checkpoint(postgres_url, (2, 3)), "a trial with a checkpoint to resume", alive=[supervisor]
    )
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)

    assert supervisor.wait(timeout=240) == 0, supervisor.err[-3000:]
    assert (
        f"trial {victim.number}: its worker process was killed by SIGKILL; queued to resume from its last checkpoint"
    ) in supervisor.err
    trials = open_study(postgres_url).get_trials()
    assert [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)] == []
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = retries_of(trials, victim.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["epochs_resumed"] >= 2
    assert sorted(t.number for t in trials if t.state == TrialState.COMPLETE) == sorted(
        [t.number for t in originals(trials) if t.number != victim.number] + [retry.number]
    )


# ---- hostile input: one line, exit 2, nothing written -----------------------------------------------------------


def _hostile(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(the create command's arguments, a piece of the expected error line) for one hostile input."""
    good = write_study(tmp_path, f"sqlite:///{tmp_path / 'w.db'}", n_trials=1, epochs=2, start_epoch=1)
    path = tmp_path / f"{case.replace(' ', '_')}.toml"
    text = good.read_text()
    extra: list[str] = []
    if case == "deep nesting":
        path.write_text(text + "deep = " + "[" * 50000 + "]" * 50000 + "\n")
        expect = "nests its tables or arrays too deeply"
    elif case == "symlink loop":
        os.symlink(path, path)
        expect = "cannot be read: Too many levels of symbolic links"
    elif case == "fifo":
        os.mkfifo(path)
        expect = "must be a regular file"
    elif case == "not utf-8":
        path.write_bytes(text.encode() + b"# \xff\xfe\n")
        expect = "must be UTF-8 text"
    elif case == "control character":
        path.write_text(text.replace('name = "w"', 'name = "w\x07"'))
        expect = "not valid TOML"
    elif case == "huge seed":
        path.write_text(re.sub(r"seed = 0(\s+shared_warmup)", rf"seed = {2**32}\1", text, count=1))
        expect = f"seed must be in 0..{2**31 - 1}, but got seed={2**32}"
    elif case == "huge budget":
        path.write_text(text.replace("n_trials = 1", "n_trials = 5000000"))
        expect = "n_trials must be <= 100000, but got n_trials=5000000"
    elif case == "in-memory storage":
        path.write_text(text)
        extra = ["--storage", "sqlite://"]
        expect = "must name a SQLite file"
    elif case == "ftp artifacts":
        path.write_text(text)
        extra = ["--artifacts", "ftp://x"]
        expect = "artifacts must be a directory or an s3://bucket/prefix URL, but got artifacts='ftp://x'"
    else:
        raise AssertionError(case)
    good.unlink()
    return [str(path), *extra], expect


@pytest.mark.parametrize(
    "case",
    [
        "deep nesting",
        "symlink loop",
        "fifo",
        "not utf-8",
        "control character",
        "huge seed",
        "huge budget",
        "in-memory storage",
        "ftp artifacts",
    ],
)
def test_hostile_input_ends_in_one_line_and_exit_2_with_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    args, expect = _hostile(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    with logging_restored():
        code = main(["create", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("koopman-search create: error:")]
    assert expect in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no database, no artifact folder


def test_a_password_with_an_unencoded_at_sign_is_never_shown() -> None:
    from koopman_search.search.studyfile.urls import redact_text, redact_url

    url = "postgresql+psycopg://koopman:p@ss@w0rd@db:5432/ks"
    assert redact_url(url) == "postgresql+psycopg://koopman:***@db:5432/ks"
    shown = redact_text(f"cannot connect to {url}: password p@ss@w0rd rejected", url)
    assert "ss@w0rd" not in shown and "p@ss" not in shown and "koopman:***@db:5432/ks" in shown


@pytest.mark.parametrize("case", ["config dir", "config fifo", "checkpoint dir in /proc", "report out in /proc"])
def test_bad_paths_of_train_and_report_end_in_one_line_and_exit_2_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    if case == "config dir":
        command, args = "train", ["--config", str(tmp_path)]
        expect = "--config must be a TOML file, but got a directory"
    elif case == "config fifo":
        os.mkfifo(tmp_path / "fifo.toml")
        command, args = "train", ["--config", str(tmp_path / "fifo.toml")]
        expect = "--config must be a regular file"
    elif case == "checkpoint dir in /proc":
        command, args = "train", ["--epochs", "1", "--koopman-start-epoch", "0", "--checkpoint-dir", "/proc/koopman-x"]
        expect = "--checkpoint-dir must be a directory this process can write to, but got checkpoint_dir='/proc/"
    else:
        study = write_study(tmp_path, f"sqlite:///{tmp_path / 'w.db'}", n_trials=1)
        command, args = "report", [str(study), "--out", "/proc/r.html"]
        expect = "--out must be in a directory this process can write to, but got out='/proc/r.html'"
    started = time.monotonic()
    with logging_restored():
        code = main([command, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    [line] = [x for x in err.splitlines() if x.startswith(f"koopman-search {command}: error:")]
    assert expect in line and "Traceback" not in err
    assert not re.search(r"^Epoch \d", err, re.M)  # no epoch trained before the error
    assert time.monotonic() - started < 60


def _cmdlines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return lines


@pytest.mark.slow
@pytest.mark.postgres
def test_a_storage_url_from_a_secret_file_never_shows_its_password_in_argv_or_output(
    tmp_path: Path,
    postgres_url: str,
    worker_env: dict[str, str],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    password = "s3cr3t-pa55"
    secret = postgres_url.replace("postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{password}@")
    url_file = tmp_path / "storage-url"
    url_file.write_text(secret + "\n")
    worker_env["KOOPMAN_STORAGE_FILE"] = str(url_file)
    study = write_study(tmp_path, "", n_trials=2, epochs=2, start_epoch=1, slow=True)
    create = subprocess.run(
        [sys.executable, "-m", "koopman_search.search.cli", "create", str(study)],
        capture_output=True,
        text=True,
        env=worker_env,
        cwd=REPO,
        timeout=120,
    )
    assert create.returncode == 0, create.stderr
    supervisor = Worker(study, ["--workers", "2"], worker_env, "supervisor", processes)
    seen: list[str] = []
    deadline = time.monotonic() + 180
    while supervisor.proc.poll() is None and time.monotonic() < deadline:
        seen += [line for line in _cmdlines() if password in line]
        time.sleep(0.2)
    assert supervisor.wait() == 0, supervisor.err[-3000:]
    assert seen == []
    assert password not in supervisor.err + supervisor.out + create.stderr + create.stdout
    assert {t.state for t in open_study(postgres_url).get_trials()} == {TrialState.COMPLETE}


@pytest.mark.slow
@pytest.mark.postgres
def test_a_database_outage_longer_than_a_workers_patience_never_gives_its_slot_up(
    tmp_path: Path,
    worker_env: dict[str, str],
    processes: list[subprocess.Popen[bytes]],
) -> None:
    worker_env["KOOPMAN_OUTAGE_TIMEOUT"] = "3"  # each worker process gives up on the database after 3 s
    with own_cluster() as pg:
        study = write_study(tmp_path, pg.url, n_trials=2, epochs=3, start_epoch=1, slow=True)
        with logging_restored():
            assert main(["create", str(study)]) == 0
        supervisor = Worker(study, ["--workers", "1"], worker_env, "supervisor", processes)
        wait_for(running_with_checkpoint(pg.url, (2,)), "a trial with a checkpoint", alive=[supervisor])
        pg.outage(25.0).join(timeout=60)  # longer than 5 restarts in a row would have lasted
        assert supervisor.wait(timeout=240) == 0, supervisor.err[-3000:]
        err = supervisor.err
        assert "the database is unreachable; starting it again in" in err
        assert "gave up" not in err and "stopped for good" not in err
        trials = open_study(pg.url).get_trials()
        assert [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)] == []
        assert len(originals(trials)) == 2
        finished = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(finished) == 2 and all(trial_attrs(t)["records"]["epoch"] == [1, 2, 3] for t in finished)


def test_an_interrupted_trial_is_reported_queued_again_and_not_counted_as_run(tmp_path: Path) -> None:
    spec = _tiny(tmp_path, tmp_path / "artifacts", n_trials=1, epochs=3)
    stop = threading.Event()
    summary = run_worker(spec, stop=stop, on_epoch=lambda _n, r: stop.set() if r.epoch == 2 else None)
    assert summary.interrupted
    [outcome] = summary.outcomes
    assert outcome.state == "FAIL" and outcome.requeued and "interrupted" in (outcome.reason or "")
    assert summary.counted == 0  # handed back: it has not used up a trial of the budget


def test_the_heartbeat_thread_survives_an_unexpected_error_and_beats_again() -> None:
    from koopman_search.search.storage.database import Heartbeat

    class Flaky:
        heartbeat_interval = 1

        def __init__(self) -> None:
            self.calls = 0
            self.beats = threading.Event()

        def record_heartbeat(self, trial_id: int) -> None:
            self.calls += 1
            if self.calls <= 2:
                raise ValueError("an unexpected answer from the database")
            self.beats.set()

    storage = Flaky()
    with Heartbeat(storage, 7, interval=0.01) as beat:  # type: ignore[arg-type]
        assert storage.beats.wait(5), "the thread stopped after an error"
    assert beat.errors == 2
