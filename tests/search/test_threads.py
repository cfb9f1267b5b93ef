"""Threads per slot (search/workers/slots.py): every worker process, CPU or GPU, gets its share of the cores,
or ``--threads``, and the trial records what it ran with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_launch_threads_reaches_the_trial_of_a_launch_in_one_process(tmp_path: Path) -> None:
    # its own process: a launch sets the torch threads of the process it runs in
    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = write_study(tmp_path, url, n_trials=1, epochs=2, start_epoch=1)
    command = [sys.executable, "-m", "koopman_search.search.cli", "-q", "launch", str(path), "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [trial] = trials_of(url, "w")
    assert trial.user_attrs["worker"]["torch_threads"] == 1


def test_the_ridge_solves_work_after_torch_set_num_threads() -> None:
    # torch 2.13's CPU build fails batched LU solves once set_num_threads(>= 2) was called; the trainer's
    # solves are Cholesky (trainer/koopman.py, spd_solve) and must keep working there
    code = (
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "from koopman_search.trainer.koopman import ridge_solve\n"
        "from koopman_search.trainer.linearity import fit_linear\n"
        "x = torch.randn(3, 2000, 256)\n"  # the user's Koopman dim: LU fails at this size, not at a small one
        "k = ridge_solve(torch.einsum('lni,lnj->lij', x, x), torch.einsum('lni,lnj->lij', x, x), 1e-3)\n"
        "assert torch.allclose(k, torch.eye(256).expand(3, 256, 256), atol=1e-3), k\n"
        "fit_linear(torch.randn(3, 1000, 64), torch.randn(3, 1000, 64))\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == "ok", done.stderr[-3000:]


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
