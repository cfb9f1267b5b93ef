"""The search service end to end, on SQLite and on a real PostgreSQL.

Launch → status → best round trip; limits that prune every trial, with their reasons; the ratio rule against
the baseline's own epoch; one baseline run for two launches started together; enqueued trials first and
once, with an exact budget; Ctrl-C and resuming; a failing baseline and its rerun; the stock ``optuna`` CLI.
Commands run in process through ``koopman_search.search.cli.main`` unless the test is about several processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from koopman_search.search.storage.layout import trial_attrs
from koopman_search.trainer.config import load_config
from koopman_search.trainer.loop import HybridKoopmanTrainer
from tests.search.study_files import (
    KOOPMAN_SEARCH,
    OPTUNA,
    PARAMS,
    cli,
    error_lines,
    interruptible,
    logging_restored,
    progress_lines,
    status_json,
    study_names,
    trials_of,
    write_study,
)

# A fixed baseline no tiny trial comes near: the ratio rule never prunes, and no baseline run is needed.
HIGH_BASELINE = [1e4, 1e4, 1e4]

HAND_TUNED: list[dict[str, Any]] = [
    {
        "label": "hand-tuned 1",
        "koopman_weight_max": 0.05,
        "koopman_start_epoch": 1,
        "fallback_threshold": 8.0,
        "schedule": "linear",
        "koopman_dim": 16,
    },
    {
        "label": "hand-tuned 2",
        "koopman_weight_max": 0.1,
        "koopman_start_epoch": 2,
        "fallback_threshold": 7.0,
        "schedule": "exponential",
        "koopman_dim": 8,
    },
]


@pytest.fixture(autouse=True)
def _service_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only ``--storage`` names the storage here, and logging is the test process's again afterwards."""
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("KOOPMAN_ARTIFACTS", raising=False)
    with logging_restored():
        yield


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OPTUNA_STORAGE", None)
    return env


def _number(line: str) -> int:
    return int(line.split()[1])


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


# ---- launch → status → best --------------------------------------------------------------------------------


def test_launch_status_best_round_trip_ends_in_a_config_that_trains(
    storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path)

    code, out, err = cli(capsys, "launch", str(study), "--storage", storage_url)
    assert code == 0, err
    lines = progress_lines(out)
    assert [_number(line) for line in lines] == [0, 1, 2, 3]
    assert all(" | COMPLETE val_ppl=" in line and " val_koopman_nre=" in line for line in lines)
    assert "study tiny (objectives: val_ppl, val_koopman_nre)" in out
    assert "Pareto front of study tiny:" in out

    data = status_json(capsys, "tiny", storage_url)
    assert data["objectives"] == ["val_ppl", "val_koopman_nre"]
    assert data["baseline"]["state"] == "complete"
    assert len(data["baseline"]["val_ppl"]) == 3
    trials = data["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    for t in trials:
        assert t["state"] == "COMPLETE"
        assert sorted(t["params"]) == sorted(PARAMS)
        # shared warmup: epochs 1..s come from the baseline's checkpoint, the trial trains s+1..3
        assert t["epochs_from_warmup"] == t["params"]["koopman_start_epoch"]
        assert t["epochs_run"] == 3 - t["epochs_from_warmup"]
        assert t["last_epoch"] == 3
        assert t["final"]["val_ppl"] == pytest.approx(t["values"]["val_ppl"], rel=1e-5)  # records keep 6 digits
        assert t["final"]["val_koopman_nre"] == pytest.approx(t["values"]["val_koopman_nre"], rel=1e-5)
        assert t["prune_reason"] is None and t["fail_reason"] is None
    assert data["totals"]["complete"] == 4
    assert data["totals"]["epochs_spent"] == sum(t["epochs_run"] for t in trials) + 3  # + the baseline's

    code, out, err = cli(capsys, "status", str(study), "--storage", storage_url)
    assert code == 0, err
    assert len([line for line in out.splitlines() if re.match(r"\d+\s+COMPLETE\s", line)]) == 4
    assert "4 complete" in out

    code, out, err = cli(capsys, "best", "--study-name", "tiny", "--storage", storage_url, "--format", "json")
    assert code == 0, err
    front = json.loads(out)["pareto_front"]
    values = {t["number"]: list(t["values"].values()) for t in trials}
    not_dominated = [n for n, v in values.items() if not any(_dominates(w, v) for w in values.values())]
    assert sorted(row["number"] for row in front) == sorted(not_dominated)
    for row in front:
        assert row["values"] == dict(zip(["val_ppl", "val_koopman_nre"], values[row["number"]], strict=True))
        assert row["params"] == trials[row["number"]]["params"]

    code, out, err = cli(capsys, "best", str(study), "--storage", storage_url, "--format", "toml")
    assert code == 0, err
    chosen = front[0]  # the Pareto trial with the best first objective
    assert f"trial {chosen['number']} of study tiny" in out
    import torch

    threads = torch.get_num_threads()  # launch ran in this process: the trials used its thread count
    assert f"# trained with {threads} torch thread(s); on CPU, OMP_NUM_THREADS={threads} reproduces it" in out
    config_file = tmp_path / "best.toml"
    config_file.write_text(out)
    cfg = load_config(config_file)
    exported = {
        "koopman_weight_max": cfg.koopman.weight_max,
        "koopman_start_epoch": cfg.koopman.start_epoch,
        "fallback_threshold": cfg.koopman.fallback_threshold,
        "schedule": cfg.koopman.schedule,
        "koopman_dim": cfg.koopman.dim,
    }
    assert exported == chosen["params"]
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.data.seq_len, cfg.train.epochs) == (16, 1, 16, 3)

    code, out, err = cli(capsys, "train", "--config", str(config_file))
    assert code == 0, err
    assert re.search(r"^Epoch 3/3: Train Loss \d", out, re.MULTILINE)


def test_best_of_a_one_objective_study_is_one_trial_with_the_lowest_val_ppl(
    storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path, n_trials=3, objectives=1, baseline=HIGH_BASELINE)
    code, out, err = cli(capsys, "launch", str(study), "--storage", storage_url)
    assert code == 0, err
    assert "best trial of study tiny:" in out

    lowest = min(t["values"]["val_ppl"] for t in status_json(capsys, "tiny", storage_url)["trials"])
    code, out, err = cli(capsys, "best", str(study), "--storage", storage_url, "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert "pareto_front" not in result
    [best] = result["best"]
    assert best["values"] == {"val_ppl": lowest}


# ---- prune rules at the service level ----------------------------------------------------------------------


def test_total_loss_limit_prunes_every_trial_at_its_first_koopman_epoch_with_the_reason(
    storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a fixed baseline curve: its total loss is unknown, so every Koopman epoch is judged
    study = write_study(tmp_path, n_trials=3, total_loss_max=0.1, baseline=HIGH_BASELINE)
    code, out, err = cli(capsys, "launch", str(study), "--storage", storage_url)
    assert code == 0, err
    lines = progress_lines(out)
    assert len(lines) == 3 and all("| PRUNED: total_loss " in line for line in lines)
    assert "study tiny: no complete trial yet" in out

    data = status_json(capsys, "tiny", storage_url)
    stored = {t.number: t for t in trials_of(storage_url, "tiny")}
    for t in data["trials"]:
        first_koopman_epoch = t["params"]["koopman_start_epoch"] + 1
        assert t["state"] == "PRUNED"
        assert re.fullmatch(rf"total_loss \d+\.\d+ > 0\.1 at epoch {first_koopman_epoch}", t["prune_reason"])
        assert stored[t["number"]].user_attrs["prune_reason"] == t["prune_reason"]
        assert stored[t["number"]].user_attrs["pruned_epoch"] == first_koopman_epoch
        assert t["epochs_run"] == first_koopman_epoch  # no baseline run, so no shared warmup to start from
    assert data["totals"]["pruned"] == 3
    assert data["totals"].get("complete", 0) == 0

    code, out, err = cli(capsys, "status", str(study), "--storage", storage_url)
    assert code == 0, err
    for t in data["trials"]:
        assert t["prune_reason"] in out


def test_val_ppl_ratio_over_a_tiny_fixed_baseline_prunes_every_trial_at_epoch_1(
    storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path, n_trials=2, baseline=[5.0, 5.0, 5.0], val_ppl_ratio_max=1.3)
    code, out, err = cli(capsys, "launch", str(study), "--storage", storage_url)
    assert code == 0, err
    assert len(progress_lines(out)) == 2

    data = status_json(capsys, "tiny", storage_url)
    assert data["baseline"] == {"state": "fixed", "val_ppl": [5.0, 5.0, 5.0], "total_loss_unjudged_epochs": []}
    for t in data["trials"]:
        assert t["state"] == "PRUNED"
        assert re.fullmatch(r"val_ppl \d+\.\d+ > 1\.3 × baseline 5\.0 = 6\.5 at epoch 1", t["prune_reason"])
        assert t["prune_reason"] in out  # the progress line says why
    assert {t.user_attrs["prune_reason"] for t in trials_of(storage_url, "tiny")} == {
        t["prune_reason"] for t in data["trials"]
    }


def test_epochs_where_the_baseline_itself_is_over_the_total_loss_limit_are_warned_of_and_not_judged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # the tiny model's LM loss stays near ln 2000 ≈ 7.6, far above 0.1: the baseline is over it at every epoch
    study = write_study(tmp_path, n_trials=2, epochs=2, steps=2, total_loss_max=0.1)
    code, out, err = cli(capsys, "launch", str(study), "--storage", url)
    assert code == 0, err
    assert "the baseline's own total loss is above total_loss_max 0.1 at epoch(s) 1, 2 (" in err
    assert "the total-loss rule does not judge trials there" in err
    assert [t.state for t in trials_of(url, "tiny")] == [TrialState.COMPLETE] * 2
    data = status_json(capsys, "tiny", url)
    assert data["baseline"]["total_loss_unjudged_epochs"] == [1, 2]
    code, out, err = cli(capsys, "status", str(study), "--storage", url)
    assert "total-loss rule: epoch(s) 1, 2 not judged, the baseline's own total loss is above total_loss_max" in out


@pytest.mark.parametrize(("curve", "pruned_epoch"), [([1e4, 10.0, 1e4], 2), ([1e4, 1e4, 10.0], 3)])
def test_ratio_rule_compares_each_epoch_with_the_baseline_at_that_epoch(
    curve: list[float], pruned_epoch: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = write_study(tmp_path, n_trials=2, baseline=curve, val_ppl_ratio_max=1.3)
    code, _, err = cli(capsys, "launch", str(study), "--storage", url)
    assert code == 0, err

    for trial in trials_of(url, "tiny"):
        records = trial_attrs(trial)["records"]
        assert trial.state == TrialState.PRUNED
        assert records["epoch"] == list(range(1, pruned_epoch + 1))
        # every epoch is far above 1.3 × 10: held to the low baseline value, any of them would have pruned
        assert min(records["val_ppl"]) > 13.0
        assert trial.user_attrs["prune_reason"].endswith(f"× baseline 10.0 = 13.0 at epoch {pruned_epoch}")


# ---- the baseline ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_launches_at_once_run_the_baseline_once_and_each_trial_once(storage_url: str, tmp_path: Path) -> None:
    study = write_study(tmp_path, n_trials=4)
    # a storage that is in use already (its tables exist), as a shared database usually is: both
    # launches then reach the new study at the same moment
    assert study_names(storage_url) == []
    command = [KOOPMAN_SEARCH, "launch", str(study), "--storage", storage_url]
    env = _subprocess_env()
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err

    assert study_names(storage_url) == ["tiny", "tiny.baseline-seed0"]
    assert [t.state for t in trials_of(storage_url, "tiny.baseline-seed0")] == [TrialState.COMPLETE]
    ran_baseline = [err for _, err in outputs if "baseline of study tiny: 3 epochs" in err]
    assert len(ran_baseline) == 1
    trials = trials_of(storage_url, "tiny")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    ran = sorted(_number(line) for out, _ in outputs for line in progress_lines(out))
    assert ran == [0, 1, 2, 3]


OPEN_AT = """
import sys, time
from koopman_search.search.storage.database import open_storage
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
open_storage(sys.argv[1])
"""


@pytest.mark.slow
def test_workers_opening_a_fresh_storage_at_the_same_moment_all_get_it(storage_url: str) -> None:
    start = time.time() + 4.0  # once every interpreter is up, so that all create the tables together
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT, storage_url, repr(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_subprocess_env(),
        )
        for _ in range(3)
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    assert study_names(storage_url) == []


def test_failing_baseline_is_reported_with_how_to_rerun_it_and_reruns_on_request(
    storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = write_study(tmp_path, n_trials=2)
    fit = HybridKoopmanTrainer.fit

    def fit_failing_without_koopman(self: HybridKoopmanTrainer, *args: Any, **kwargs: Any) -> Any:
        if not self.cfg.koopman.enabled:  # only the baseline runs with the Koopman loss off
            raise RuntimeError("CUDA error: out of memory")
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(HybridKoopmanTrainer, "fit", fit_failing_without_koopman)
    code, out, err = cli(capsys, "launch", str(study), "--storage", storage_url)
    assert code == 1
    [line] = error_lines(err, "launch")
    assert "the baseline run of study tiny failed: RuntimeError: CUDA error: out of memory" in line
    assert f"`koopman-search launch {study} --rerun-baseline`" in line
    assert progress_lines(out) == []
    data = status_json(capsys, "tiny", storage_url)
    assert data["baseline"]["state"] == "failed"
    assert [t["state"] for t in data["trials"]] == ["WAITING", "WAITING"]

    monkeypatch.setattr(HybridKoopmanTrainer, "fit", fit)  # the cause is fixed
    code, out, err = cli(capsys, "launch", str(study), "--storage", storage_url)
    assert code == 1  # a failed baseline is not run again unasked
    assert "--rerun-baseline" in error_lines(err, "launch")[0]

    code, out, err = cli(capsys, "launch", str(study), "--storage", storage_url, "--rerun-baseline")
    assert code == 0, err
    assert len(progress_lines(out)) == 2
    baseline_states = [t.state for t in trials_of(storage_url, "tiny.baseline-seed0")]
    assert baseline_states == [TrialState.FAIL, TrialState.COMPLETE]
    data = status_json(capsys, "tiny", storage_url)
    assert data["baseline"]["state"] == "complete"
    assert [t["state"] for t in data["trials"]] == ["COMPLETE", "COMPLETE"]


# ---- the queue ---------------------------------------------------------------------------------------------


def test_status_shows_the_parameters_of_queued_trials_before_they_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage_url = f"sqlite:///{tmp_path / 'queued.db'}"
    study = write_study(tmp_path, n_trials=3, baseline=HIGH_BASELINE, enqueue=HAND_TUNED)
    code, _, err = cli(capsys, "create", str(study), "--storage", storage_url)
    assert code == 0, err
    code, out, err = cli(capsys, "status", str(study), "--storage", storage_url, "--format", "json")
    assert code == 0, err
    trials = json.loads(out)["trials"]
    assert [t["state"] for t in trials] == ["WAITING"] * 3
    for trial, item in zip(trials[:2], HAND_TUNED, strict=True):
        assert trial["params"] == {k: v for k, v in item.items() if k != "label"}
    assert trials[2]["params"] == {}  # the sampler chooses when it runs


def test_enqueued_trials_run_first_and_once_and_the_budget_is_exact(
    storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path, n_trials=3, baseline=HIGH_BASELINE, enqueue=HAND_TUNED)
    for queued in ("3", "0"):
        code, out, err = cli(capsys, "create", str(study), "--storage", storage_url)
        assert code == 0, err
        assert f"{queued} trial(s) queued" in out

    code, out, err = cli(capsys, "launch", str(study), "--storage", storage_url)
    assert code == 0, err
    lines = progress_lines(out)
    assert [_number(line) for line in lines] == [0, 1, 2]
    assert lines[0].startswith("trial 0 [hand-tuned 1] ")
    assert lines[1].startswith("trial 1 [hand-tuned 2] ")

    for argv in (["launch"], ["create"], ["launch", "--n-trials", "3"]):
        code, out, err = cli(capsys, *argv, str(study), "--storage", storage_url)
        assert code == 0, err
        assert progress_lines(out) == []

    trials = trials_of(storage_url, "tiny")
    assert len(trials) == 3
    assert [t.user_attrs.get("label") for t in trials] == ["hand-tuned 1", "hand-tuned 2", None]
    for trial, item in zip(trials[:2], HAND_TUNED, strict=True):
        assert trial.params == {k: v for k, v in item.items() if k != "label"}
    assert all(t.state == TrialState.COMPLETE for t in trials)

    code, out, err = cli(capsys, "launch", str(study), "--storage", storage_url, "--n-trials", "4")
    assert code == 0, err
    assert [_number(line) for line in progress_lines(out)] == [3]  # a larger budget adds just the difference
    trials = trials_of(storage_url, "tiny")
    assert len(trials) == 4
    assert [t.user_attrs.get("label") for t in trials].count("hand-tuned 1") == 1


# ---- Ctrl-C ------------------------------------------------------------------------------------------------


def _running_trial_with_checkpoint(db: Path) -> bool:
    """Whether a trial of the study is RUNNING and has saved a checkpoint of its own."""
    if not db.exists():
        return False
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            row = conn.execute(
                "SELECT COUNT(*) FROM trials t JOIN trial_system_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'koopman_search:checkpoint'"
            ).fetchone()
        except sqlite3.OperationalError:  # the tables are not there yet
            return False
    return bool(row[0])


@pytest.mark.slow
def test_ctrl_c_leaves_no_trial_running_and_the_next_launch_resumes_the_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    study = write_study(tmp_path, n_trials=2, epochs=4, steps=120, baseline=[1e4] * 4)
    process = subprocess.Popen(
        [KOOPMAN_SEARCH, "launch", str(study), "--storage", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
        preexec_fn=interruptible,
    )
    try:
        deadline = time.monotonic() + 120
        while not _running_trial_with_checkpoint(db):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no trial finished an epoch within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "run `koopman-search launch" in err

    trials = trials_of(url, "tiny")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    [interrupted] = [t for t in trials if t.state == TrialState.FAIL]
    assert "interrupted" in interrupted.user_attrs["fail_reason"]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == interrupted.number]
    assert retry.state == TrialState.WAITING
    assert retry.params == interrupted.params

    code, out, err = cli(capsys, "launch", str(study), "--storage", url)
    assert code == 0, err
    trials = trials_of(url, "tiny")
    resumed = trials[retry.number]
    assert resumed.state == TrialState.COMPLETE
    assert resumed.user_attrs["epochs_resumed"] >= 1
    [line] = [line for line in progress_lines(out) if _number(line) == retry.number]
    assert f"resumed after epoch {resumed.user_attrs['epochs_resumed']}" in line
    issued = [t for t in trials if "failed_trial" not in t.system_attrs]
    assert len(issued) == 2  # the retry does not count against the budget
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]


# ---- the stock optuna CLI ----------------------------------------------------------------------------------


def test_stock_optuna_cli_lists_the_study_and_its_trials(
    storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path, n_trials=2, baseline=HIGH_BASELINE)
    code, _, err = cli(capsys, "launch", str(study), "--storage", storage_url)
    assert code == 0, err
    env = _subprocess_env()

    listed = subprocess.run(
        [OPTUNA, "studies", "--storage", storage_url], capture_output=True, text=True, env=env, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^\|\s*tiny\s*\|", listed.stdout, re.MULTILINE)

    shown = subprocess.run(
        [OPTUNA, "trials", "--study-name", "tiny", "--storage", storage_url, "-f", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert [(r["number"], r["state"]) for r in rows] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert all(sorted(r["params"]) == sorted(PARAMS) for r in rows)
    # the short attrs are there to read; the per-epoch records (bulky JSON) are system attrs, read by
    # `koopman-search status` and the review, and kept out of this table and the dashboard's
    assert all(r["user_attrs"]["epochs_run"] >= 1 and "records" not in r["user_attrs"] for r in rows)
    assert all(trial_attrs(t)["records"]["epoch"] == [1, 2, 3] for t in trials_of(storage_url, "tiny"))
