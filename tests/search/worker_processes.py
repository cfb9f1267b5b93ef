"""Worker processes in tests: ``koopman-search worker`` started as a user starts it, and what to wait for."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from koopman_search.search.storage.database import open_storage
from koopman_search.search.storage.layout import trial_attrs

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class Worker:
    """``koopman-search worker STUDY ARGS...`` in a process of its own, output in files."""

    def __init__(
        self, study: Path, args: Sequence[str], env: dict[str, str], tag: str, processes: list[subprocess.Popen[bytes]]
    ) -> None:
        self.out_path = study.parent / f"{tag}.out"
        self.err_path = study.parent / f"{tag}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "koopman_search.search.cli", "worker", str(study), *args],
                stdout=out,
                stderr=err,
                env=env,
                cwd=REPO,
            )
        processes.append(self.proc)

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not finish in {timeout} s; stderr:\n{self.err[-3000:]}")

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()


def wait_for(predicate: Callable[[], T | None], what: str, timeout: float = 120, alive: Sequence[Worker] = ()) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for w in alive:
            if w.proc.poll() is not None:
                pytest.fail(f"worker exited ({w.proc.returncode}) while waiting for {what}:\n{w.err[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def open_study(url: str, name: str = "w") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))


def originals(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if "failed_trial" not in t.system_attrs]


def retries_of(trials: Sequence[FrozenTrial], number: int) -> list[FrozenTrial]:
    return [t for t in trials if t.system_attrs.get("failed_trial") == number]


def assert_records_complete(trial: FrozenTrial) -> None:
    """Every epoch from 1 to the trial's last is stored, in every column."""
    columns = trial_attrs(trial)["records"]
    last = columns["epoch"][-1]
    assert columns["epoch"] == list(range(1, last + 1)), trial.number
    assert {len(values) for values in columns.values()} == {last}, trial.number


def assert_study_done(trials: Sequence[FrozenTrial], n_trials: int) -> None:
    """Exactly the budget issued, nothing left running or queued, every result with all its records."""
    assert len(originals(trials)) == n_trials
    assert len({t.number for t in trials}) == len(trials)
    assert [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)] == []
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            assert_records_complete(t)


def running_with_checkpoint(url: str, epochs: Sequence[int]) -> Callable[[], FrozenTrial | None]:
    """A RUNNING trial whose last stored checkpoint is after one of ``epochs``."""
    study = open_study(url)

    def find() -> FrozenTrial | None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial_attrs(t).get("checkpoint", {}).get("epoch") in epochs and "worker" in t.user_attrs:
                return t
        return None

    return find
