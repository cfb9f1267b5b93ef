"""deploy/slurm/worker.sbatch, checked without Slurm: its syntax, its #SBATCH options, and the script itself
run as Slurm runs it (the SLURM_* variables of an array task set, the job's directory the submit
directory).

Two things are stand-ins, because this machine has neither: ``scontrol`` (a script on PATH that records how
it was called), and, in the first run only, the GPU: the default ``--gpus all`` needs one, so that run's
``koopman-search`` is a script that parses its arguments with the real CLI parser and records them. The
other runs use the real ``koopman-search worker`` on CPU (``WORKER_ARGS=--workers 1``) on a tiny study.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from koopman_search.search.storage.layout import trial_attrs
from tests.search.study_files import KOOPMAN_SEARCH, write_study

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "slurm" / "worker.sbatch"
SLOWEST_EPOCH_S = 96  # the user's slowest epoch: a stopping worker must be given longer

PARSE_STUB = """#!{python}
import json, os, sys
sys.path.insert(0, {repo!r})
from koopman_search.search.cli import build_parser
args = build_parser().parse_args(sys.argv[1:])  # exits 2 on arguments the real CLI rejects
with open(os.environ["STUB_RECORD"], "w") as fh:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "command": args.command,
               "storage": os.environ.get("OPTUNA_STORAGE"), "artifacts": os.environ.get("KOOPMAN_ARTIFACTS"),
               "sid_is_own": os.getsid(0) == os.getpid()}}, fh)
"""
SCONTROL_STUB = """#!/bin/sh
echo "$@" >> "$SCONTROL_RECORD"
"""


def _directives() -> dict[str, str]:
    found = {}
    for line in SCRIPT.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(\S+))?", line.strip())
        if match:
            found[match[1]] = match[2] or ""
    return found


def _slurm_env(tmp_path: Path, submit_dir: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(SCONTROL_STUB)
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        {
            "PATH": f"{bin_dir}:{env['PATH']}",
            "SCONTROL_RECORD": str(tmp_path / "scontrol.log"),
            "SLURM_JOB_ID": "4242",
            "SLURM_ARRAY_JOB_ID": "4240",
            "SLURM_ARRAY_TASK_ID": "2",
            "SLURM_SUBMIT_DIR": str(submit_dir),
            "SLURM_RESTART_COUNT": "0",
            "CUDA_VISIBLE_DEVICES": "0",
            "KOOPMAN_HEARTBEAT_INTERVAL": "1",
            "PYTHONPATH": str(REPO),
            **extra,
        }
    )
    return env


def _scontrol_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def test_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_sbatch_options_ask_for_an_array_of_one_gpu_tasks_that_requeue_and_get_time_to_stop() -> None:
    options = _directives()
    assert options["gres"] == "gpu:1"
    assert re.fullmatch(r"\d+-\d+", options["array"])
    assert "requeue" in options
    signal_spec = re.fullmatch(r"B:TERM@(\d+)", options["signal"])  # to the batch script, which passes it on
    assert signal_spec and int(signal_spec[1]) > SLOWEST_EPOCH_S


def test_script_refuses_to_start_without_the_database_url(tmp_path: Path) -> None:
    env = _slurm_env(tmp_path, REPO)
    env.pop("OPTUNA_STORAGE", None)
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=False, timeout=30)
    assert done.returncode != 0
    assert "export OPTUNA_STORAGE=postgresql+psycopg://" in done.stderr


def test_script_runs_the_worker_command_in_the_submit_directory_with_the_default_arguments(tmp_path: Path) -> None:
    stub = tmp_path / "koopman-search"
    stub.write_text(PARSE_STUB.format(python=sys.executable, repo=str(REPO)))
    stub.chmod(0o755)
    env = _slurm_env(
        tmp_path,
        REPO,
        KOOPMAN_SEARCH=str(stub),
        STUB_RECORD=str(tmp_path / "call.json"),
        OPTUNA_STORAGE="postgresql+psycopg://koopman:pw@db:5432/koopman",
        KOOPMAN_ARTIFACTS="/shared/artifacts",
    )
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    call = json.loads((tmp_path / "call.json").read_text())
    assert call["argv"] == ["worker", "studies/wikitext2.toml", "--gpus", "all"]
    assert call["command"] == "worker" and Path(call["cwd"]) == REPO
    assert (REPO / call["argv"][1]).is_file()
    assert (call["storage"], call["artifacts"]) == (env["OPTUNA_STORAGE"], env["KOOPMAN_ARTIFACTS"])
    assert call["sid_is_own"]  # its own session: group signals reach it only through the script
    assert "koopman-worker 4240_2" in done.stderr
    assert _scontrol_calls(tmp_path) == []  # it finished: nothing to requeue


def _tiny_study(tmp_path: Path, slow: bool) -> tuple[Path, str]:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = write_study(tmp_path, n_trials=2, epochs=3, storage=url, baseline=[2000.0] * 3)
    if slow:  # a pause in every training step, so that a signal lands in the middle of a trial
        factory = 'factory = "tests.search.slow_model:build"\n'
        study.write_text(study.read_text().replace("[trainer.model]\n", "[trainer.model]\n" + factory))
    created = subprocess.run(
        [KOOPMAN_SEARCH, "-q", "create", str(study), "--artifacts", str(tmp_path / "a")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    return study, url


@pytest.mark.slow
def test_script_runs_the_real_worker_until_the_queue_is_empty(tmp_path: Path) -> None:
    study, url = _tiny_study(tmp_path, slow=False)
    env = _slurm_env(
        tmp_path,
        REPO,
        KOOPMAN_SEARCH=KOOPMAN_SEARCH,
        STUDY_FILE=str(study),
        WORKER_ARGS="--workers 1",
        OPTUNA_STORAGE=url,
        KOOPMAN_ARTIFACTS=str(tmp_path / "a"),
    )
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = optuna.load_study(storage=url, study_name="tiny").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert _scontrol_calls(tmp_path) == []


@pytest.mark.slow
def test_sigterm_hands_the_trial_back_and_requeues_the_task(tmp_path: Path) -> None:
    study, url = _tiny_study(tmp_path, slow=True)
    env = _slurm_env(
        tmp_path,
        REPO,
        KOOPMAN_SEARCH=KOOPMAN_SEARCH,
        STUDY_FILE=str(study),
        WORKER_ARGS="--workers 1",
        OPTUNA_STORAGE=url,
        KOOPMAN_ARTIFACTS=str(tmp_path / "a"),
        KOOPMAN_TEST_STEP_SECONDS="0.3",
    )
    script = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until a trial has checkpointed an epoch
            trials = optuna.load_study(storage=url, study_name="tiny").get_trials()
            if any(t.state == TrialState.RUNNING and trial_attrs(t).get("checkpoint") for t in trials):
                break
            time.sleep(0.5)
        else:
            pytest.fail("no trial reached its first checkpoint")
        script.send_signal(signal.SIGTERM)  # as Slurm does before the time limit (--signal=B:TERM@...)
        _, err = script.communicate(timeout=120)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 0, err[-3000:]
    trials = optuna.load_study(storage=url, study_name="tiny").get_trials()
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 1 and "queued to resume from its checkpoint" in stopped[0].user_attrs["fail_reason"]
    retry = [t for t in trials if "failed_trial" in t.system_attrs]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].system_attrs["failed_trial"] == stopped[0].number
    assert trial_attrs(retry[0])["checkpoint"]["epoch"] >= 1  # it resumes from there, not from scratch
    assert _scontrol_calls(tmp_path) == ["requeue 4242"]
