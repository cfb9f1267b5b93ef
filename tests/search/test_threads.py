"""Threads per slot (search/workers/slots.py): every worker process, CPU or GPU, gets its share of the cores,
or ``--threads``, and the trial records what it ran with."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from koopman_search.search.cli import main
from koopman_search.search.errors import SpecError
from koopman_search.search.workers import plan_slots
from koopman_search.search.workers.slots import threads_per_slot
from tests.search.study_files import logging_restored, trials_of
from tests.search.study_files import write_worker_study as write_study


@pytest.mark.parametrize(("workers", "expected"), [(1, 8), (2, 4), (4, 2)])
def test_cpu_slots_share_the_cores(workers: int, expected: int) -> None:
    slots = plan_slots([], workers=workers, cores=8)
    assert [s.threads for s in slots] == [expected] * workers
    assert {s.env["OMP_NUM_THREADS"] for s in slots} == {str(expected)}
    assert {s.env["MKL_NUM_THREADS"] for s in slots} == {str(expected)}


@pytest.mark.parametrize(("gpus", "per_gpu", "expected"), [([0], 1, 32), ([0, 1], 1, 16), ([0, 1], 2, 8)])
def test_gpu_slots_get_their_share_of_the_cores_too(gpus: list[int], per_gpu: int, expected: int) -> None:
    slots = plan_slots(gpus, trials_per_gpu=per_gpu, cores=32)
    assert [s.threads for s in slots] == [expected] * (len(gpus) * per_gpu)
    assert all(s.device == "cuda" and s.env["OMP_NUM_THREADS"] == str(expected) for s in slots)


def test_more_slots_than_cores_get_one_thread_each_and_threads_overrides() -> None:
    assert [s.threads for s in plan_slots([], workers=4, cores=2)] == [1, 1, 1, 1]
    assert [s.threads for s in plan_slots([0, 1], trials_per_gpu=2, cores=64, threads=3)] == [3, 3, 3, 3]
    assert threads_per_slot(3, cores=8) == 2
    with pytest.raises(SpecError, match="--threads must be >= 1, but got threads=0"):
        threads_per_slot(1, threads=0)


@pytest.fixture
def torch_threads_restored() -> Iterator[None]:
    """An in-process launch sets this process's torch threads; the tests after it get theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_launch_threads_reaches_the_trial_in_process(tmp_path: Path, torch_threads_restored: None) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = write_study(tmp_path, url, n_trials=1, epochs=2, start_epoch=1)
    with logging_restored():
        assert main(["launch", str(path), "--threads", "1"]) == 0
    [trial] = trials_of(url, "w")
    assert trial.user_attrs["worker"]["torch_threads"] == 1


@pytest.mark.slow
def test_launch_threads_reaches_the_trials_of_worker_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = write_study(tmp_path, url, n_trials=2, epochs=2, start_epoch=1)
    with logging_restored():
        # 3 is no share of this machine's cores that a default would give two processes
        assert main(["launch", str(path), "--workers", "2", "--threads", "3"]) == 0
    trials = trials_of(url, "w")
    assert [t.user_attrs["worker"]["torch_threads"] for t in trials] == [3, 3]


def test_a_bad_thread_count_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path, f"sqlite:///{tmp_path / 'w.db'}")
    with logging_restored():
        assert main(["launch", str(path), "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threads must be >= 1, but got threads=0" in err
    assert not (tmp_path / "w.db").exists()
