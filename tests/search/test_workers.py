"""Worker processes: GPU slots, the supervisor, and fault tolerance against a real PostgreSQL.

CPU processes stand in for GPUs. The studies are tiny (d_model 16, one block, 8 steps of 8 x 16 tokens per
epoch); tests that kill or stop a process mid-trial use ``tests.search.slow_model``, whose pause per step
gives every epoch a known minimum length. Worker processes get ``KOOPMAN_HEARTBEAT_INTERVAL=1``, so a
killed trial goes stale after 4 s.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from itertools import count
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from koopman_search.search.cli import main
from koopman_search.search.errors import SpecError
from koopman_search.search.storage.database import open_storage
from koopman_search.search.storage.layout import trial_attrs
from koopman_search.search.studyfile.spec import load_spec
from koopman_search.search.workers import MAX_RESTARTS, Slot, Supervisor, parse_gpus, plan_slots, run_worker
from koopman_search.search.workers.child import _watch_supervisor
from koopman_search.search.workers.slots import split_trials
from koopman_search.trainer.alloc import GLIBC_TUNED
from koopman_search.trainer.errors import ConfigError
from tests.search.study_files import write_worker_study as write_study
from tests.search.worker_processes import (
    Worker,
    assert_study_done,
    open_study,
    originals,
    retries_of,
    running_with_checkpoint,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


# ---- GPU slots (no GPU needed) ---------------------------------------------------------------------------


def test_parse_gpus_reads_a_list_and_all() -> None:
    assert parse_gpus("0,1,3", available=4) == [0, 1, 3]
    assert parse_gpus(" 3, 0 ", available=4) == [3, 0]
    assert parse_gpus("all", available=2) == [0, 1]
    assert parse_gpus("ALL", available=1) == [0]
    assert parse_gpus(None, available=8) == []


@pytest.mark.parametrize(
    ("spec", "available", "match"),
    [
        ("0,x", 4, r"GPU indices separated by commas, like 0,1,3, or all, but got gpus='0,x'"),
        ("1.5", 4, r"but got gpus='1.5'"),
        ("-1", 4, r"but got gpus='-1'"),
        ("", 4, r"but got gpus=''"),
        ("0,,1", 4, r"but got gpus='0,,1'"),
        ("0,1,0", 4, r"each GPU once, but got GPU 0 twice in gpus='0,1,0'"),
        ("4", 4, r"GPUs that exist, but got GPU 4 in gpus='4' and 4 GPU\(s\) visible here; use 0..3"),
        ("0", 0, r"no CUDA GPU is visible here; leave --gpus out to run on CPU"),
        ("all", 0, r"--gpus all needs at least one CUDA GPU, but no CUDA GPU is visible here"),
    ],
)
def test_parse_gpus_rejects_bad_lists(spec: str, available: int, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_gpus(spec, available)


def test_plan_slots_pins_each_process_to_one_gpu_in_a_stable_order() -> None:
    slots = plan_slots([0, 1, 3], trials_per_gpu=2)
    assert [s.index for s in slots] == [0, 1, 2, 3, 4, 5]
    assert [s.gpu for s in slots] == [0, 0, 1, 1, 3, 3]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "1", "1", "3", "3"]
    assert {s.device for s in slots} == {"cuda"}
    assert plan_slots([0, 1, 3], 2) == slots  # the same every time


def test_plan_slots_maps_indices_through_the_parents_visible_devices() -> None:
    slots = plan_slots([0, 2], 1, visible_devices="4,5,GPU-7f3a")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["4", "GPU-7f3a"]
    with pytest.raises(SpecError, match=r"listed in CUDA_VISIBLE_DEVICES='4', but got GPU 1"):
        plan_slots([1], 1, visible_devices="4")


def test_plan_slots_without_gpus_makes_cpu_processes_that_see_no_gpu() -> None:
    threads = {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}  # the slot's share of 4 cores (test_threads.py)
    assert plan_slots([], 1, workers=None, cores=4) == [
        Slot(0, None, {"CUDA_VISIBLE_DEVICES": "", **threads}, "cpu", 4)
    ]
    slots = plan_slots([], 1, workers=3)
    assert [(s.index, s.gpu, s.device, s.env["CUDA_VISIBLE_DEVICES"]) for s in slots] == [
        (0, None, "cpu", ""),
        (1, None, "cpu", ""),
        (2, None, "cpu", ""),
    ]


def test_plan_slots_rejects_bad_counts() -> None:
    with pytest.raises(SpecError, match=r"--trials-per-gpu must be >= 1, but got trials_per_gpu=0"):
        plan_slots([0], 0)
    with pytest.raises(SpecError, match=r"--workers must be >= 1, but got workers=0"):
        plan_slots([], 1, workers=0)
    with pytest.raises(
        SpecError,
        match=r"GPUs x --trials-per-gpu = 2 x 2 = 4\) when --gpus is given, but got "
        r"workers=3",
    ):
        plan_slots([0, 1], 2, workers=3)
    assert len(plan_slots([0, 1], 2, workers=4)) == 4


def test_trial_cap_is_split_evenly_over_the_slots() -> None:
    assert split_trials(3, None) == [None, None, None]
    assert split_trials(3, 7) == [3, 2, 2]
    assert split_trials(3, 2) == [1, 1, 0]
    assert sum(split_trials(4, 9)) == 9  # type: ignore[arg-type]


# ---- the supervisor with stand-in worker processes ---------------------------------------------------------


def tiny_spec(tmp_path: Path) -> Any:
    return load_spec(write_study(tmp_path, f"sqlite:///{tmp_path / 'unused.db'}"))


def fake_worker(tmp_path: Path, body: str) -> list[str]:
    """A stand-in for ``python -m koopman_search.search.workers``: reads the job, then runs ``body``. ``emit(event,
    **fields)`` writes an event; ``mark(text)`` appends a line to ``marks.txt``."""
    script = tmp_path / "fake_worker.py"
    script.write_text(
        textwrap.dedent("""
        import json, os, signal, sys, time
        job = json.loads(sys.stdin.readline())
        def emit(event, **fields):
            print(json.dumps({"event": event, **fields}), flush=True)
        def mark(text):
            with open(os.path.join(os.path.dirname(__file__), "marks.txt"), "a") as fh:
                fh.write(text + "\\n")
    """)
        + textwrap.dedent(body)
    )
    return [sys.executable, str(script)]


def marks(tmp_path: Path) -> list[str]:
    path = tmp_path / "marks.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_supervisor_prints_finished_trials_on_stdout_and_one_status_line_per_change(tmp_path: Path) -> None:
    command = fake_worker(
        tmp_path,
        """
        mark(f"slot {job['slot']} device {job['device']} cuda {os.environ['CUDA_VISIBLE_DEVICES']!r}")
        emit("trial", number=7 + job["slot"])
        emit("epoch", number=7 + job["slot"], epoch=1, epochs=3, val_ppl=123.456)
        print("a stray print", flush=True)
        print("a log line", file=sys.stderr, flush=True)
        emit("outcome", number=7 + job["slot"], state="COMPLETE", line=f"trial {7 + job['slot']} | COMPLETE")
        emit("exit", reason="queue empty")
    """,
    )
    out, err = io.StringIO(), io.StringIO()
    slots = [Slot(0, 0, {"CUDA_VISIBLE_DEVICES": "0"}, "cuda"), Slot(1, 1, {"CUDA_VISIBLE_DEVICES": "1"}, "cuda")]
    code = Supervisor(tiny_spec(tmp_path), slots, out=out, err=err, live=False, command=command).run()
    assert code == 0
    assert sorted(out.getvalue().splitlines()) == ["trial 7 | COMPLETE", "trial 8 | COMPLETE"]
    assert sorted(marks(tmp_path)) == ["slot 0 device cuda cuda '0'", "slot 1 device cuda cuda '1'"]
    log = err.getvalue()
    assert "slot 0 (GPU 0): trial 7 epoch 1/3  val_ppl 123.46  ETA ? (pid " in log
    assert "trials 1/? done" in log  # the n/N line after each finished trial
    assert "slot 1 (GPU 1): trial 8 COMPLETE" in log
    assert "[slot 0] a log line" in log and "[slot 1] a stray print" in log
    assert "slot 0 (GPU 0): finished (1 trial(s))" in log


def test_live_board_keeps_the_status_lines_below_the_log_and_results(tmp_path: Path) -> None:
    command = fake_worker(
        tmp_path,
        """
        emit("trial", number=job["slot"])
        print("a log line", file=sys.stderr, flush=True)
        emit("outcome", number=job["slot"], state="PRUNED", reason="total_loss 7.1 > 7.0 at epoch 2",
             line="trial 0 | PRUNED")
    """,
    )
    out, err = io.StringIO(), io.StringIO()
    code = Supervisor(tiny_spec(tmp_path), plan_slots([], 1), out=out, err=err, live=True, command=command).run()
    assert code == 0
    assert out.getvalue() == "trial 0 | PRUNED\n"
    screen = err.getvalue()
    # each redraw moves up over the one status line and erases it, so the log line stays above the board
    # the board is the slot's line and the n/N trials line
    assert "\x1b[2F\x1b[J[slot 0] a log line\nslot 0 (CPU): " in screen
    assert "slot 0 (CPU): trial 0 PRUNED: total_loss 7.1 > 7.0 at epoch 2 (pid " in screen
    assert screen.endswith("\x1b[2F\x1b[Jslot 0 (CPU): finished (1 trial(s))\ntrials 1/? done, ETA ?\n")


def test_live_board_follows_the_steps_inside_an_epoch_and_a_log_leaves_them_out(tmp_path: Path) -> None:
    script = """
        emit("trial", number=3)
        emit("step", number=3, epoch=2, epochs=4, step=50, steps=100)
        emit("step", number=None, epoch=1, epochs=4, step=7, steps=100)
    """
    screens = []
    for live in (True, False):
        err = io.StringIO()
        sup = Supervisor(
            tiny_spec(tmp_path), plan_slots([], 1), out=io.StringIO(), err=err, live=live,
            command=fake_worker(tmp_path, script),
        )  # fmt: skip
        assert sup.run() == 0
        screens.append(err.getvalue())
    live_screen, log = screens
    assert "slot 0 (CPU): trial 3 epoch 2/4 step 50/100  ETA ? (pid " in live_screen
    assert "slot 0 (CPU): baseline epoch 1/4 step 7/100  ETA ? (pid " in live_screen
    assert "step 50/100" not in log and "step 7/100" not in log


def test_steps_reach_the_supervisor_at_most_once_a_second() -> None:
    from koopman_search.search.workers.child import _steps_to

    sent: list[tuple[str, dict[str, Any]]] = []
    writer = SimpleNamespace(emit=lambda name, **fields: sent.append((name, fields)))
    on_step = _steps_to(writer)  # type: ignore[arg-type]
    for step in range(1, 101):
        on_step(0, 1, 2, step, 100)  # a hundred steps within well under a second
    assert sent == []
    time.sleep(1.05)
    on_step(0, 1, 2, 50, 100)
    on_step(0, 1, 2, 51, 100)
    assert sent == [("step", {"number": 0, "epoch": 1, "epochs": 2, "step": 50, "steps": 100})]


def test_supervisor_restarts_a_crashing_slot_a_bounded_number_of_times(tmp_path: Path) -> None:
    command = fake_worker(
        tmp_path,
        """
        mark("start")
        sys.exit(1)
    """,
    )
    err = io.StringIO()
    clock = count(0.0, 1000.0)  # every look at the clock is past any restart delay
    code = Supervisor(
        tiny_spec(tmp_path),
        plan_slots([], 1),
        out=io.StringIO(),
        err=err,
        live=False,
        command=command,
        clock=lambda: float(next(clock)),
    ).run()
    assert code == 1
    assert marks(tmp_path) == ["start"] * (1 + MAX_RESTARTS)
    assert f"exited with status 1; gave up after {1 + MAX_RESTARTS} crashes in a row" in err.getvalue()
    assert "starting again in 1 s" in err.getvalue() and "starting again in 2 s" in err.getvalue()


def test_supervisor_does_not_restart_a_slot_that_failed_for_good(tmp_path: Path) -> None:
    command = fake_worker(
        tmp_path,
        """
        mark("start")
        print("baseline failed: fix the study", file=sys.stderr)
        sys.exit(3)
    """,
    )
    err = io.StringIO()
    code = Supervisor(
        tiny_spec(tmp_path), plan_slots([], 1), out=io.StringIO(), err=err, live=False, command=command
    ).run()
    assert code == 1
    assert marks(tmp_path) == ["start"]
    assert "slot 0 (CPU): failed (exited with status 3); not started again" in err.getvalue()


def test_supervisor_restart_gets_the_rest_of_the_slots_trial_cap(tmp_path: Path) -> None:
    # each process finishes one trial, then crashes: finishing a trial resets the crash count, and the slot
    # ends once it has started its share of --max-trials
    command = fake_worker(
        tmp_path,
        """
        mark(f"max_trials={job['max_trials']}")
        emit("trial", number=len(open(os.path.join(os.path.dirname(__file__), "marks.txt")).readlines()))
        emit("outcome", number=0, state="COMPLETE", line="done")
        sys.exit(1)
    """,
    )
    clock = count(0.0, 1000.0)
    code = Supervisor(
        tiny_spec(tmp_path),
        plan_slots([], 1),
        max_trials=MAX_RESTARTS + 3,
        out=io.StringIO(),
        err=io.StringIO(),
        live=False,
        command=command,
        clock=lambda: float(next(clock)),
    ).run()
    assert code == 0
    assert marks(tmp_path) == [f"max_trials={n}" for n in range(MAX_RESTARTS + 3, 0, -1)]


def test_supervisor_passes_a_stop_request_on_to_every_slot(tmp_path: Path) -> None:
    command = fake_worker(
        tmp_path,
        """
        def on_term(signum, frame):
            mark(f"slot {job['slot']} got SIGTERM")
            emit("exit", reason="stopped")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        mark(f"slot {job['slot']} ready")
        time.sleep(60)
        mark("never stopped")
    """,
    )
    err = io.StringIO()
    supervisor = Supervisor(
        tiny_spec(tmp_path), plan_slots([], 1, workers=2), out=io.StringIO(), err=err, live=False, command=command
    )
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.run(handle_signals=False)))
    thread.start()
    wait_for(lambda: len(marks(tmp_path)) == 2 or None, "both slots to start", timeout=30)
    supervisor.request_stop()
    thread.join(timeout=30)
    assert result == [0]
    assert supervisor.stop_requested
    assert sorted(marks(tmp_path)) == ["slot 0 got SIGTERM", "slot 0 ready", "slot 1 got SIGTERM", "slot 1 ready"]
    assert "slot 1 (CPU): stopped" in err.getvalue()


def test_worker_process_stops_when_its_supervisor_goes_away() -> None:
    # a real process holds the other end of the pipe, as the supervisor holds a worker's stdin
    supervisor = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print('job', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert supervisor.stdout is not None
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_supervisor, args=(supervisor.stdout, stop), daemon=True)
    watcher.start()
    watcher.join(timeout=1.0)
    assert watcher.is_alive() and not stop.is_set()  # the supervisor lives: the worker goes on
    supervisor.kill()  # SIGKILL: no goodbye, only the pipe's end of file
    supervisor.wait(timeout=10)
    watcher.join(timeout=10)
    assert stop.is_set()


# ---- the worker command ------------------------------------------------------------------------------------


def test_worker_command_says_how_to_create_a_missing_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write_study(tmp_path, f"sqlite:///{tmp_path / 'w.db'}")
    assert main(["worker", str(study), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "koopman-search worker: error: study 'w' does not exist in sqlite:///" in err
    assert f"create it first with `koopman-search create {study}`" in err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--gpus", "0;1"], "--gpus must be GPU indices separated by commas, like 0,1,3, or all, but got gpus='0;1'"),
        (["--workers", "0"], "--workers must be >= 1, but got workers=0"),
        (["--max-trials", "0"], "--max-trials must be >= 1, but got max_trials=0"),
        (["--n-trials", "4"], "worker takes no --n-trials (got n_trials=4): --n-trials is the study's budget"),
        (["--trials-per-gpu", "0"], "--trials-per-gpu must be >= 1, but got trials_per_gpu=0"),
    ],
)
def test_worker_command_rejects_bad_options_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str
) -> None:
    study = write_study(tmp_path, f"sqlite:///{tmp_path / 'w.db'}")
    assert main(["worker", str(study), *args]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "w.db").exists()  # checked before any storage is touched


def test_worker_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal
    assert "koopman-search worker studies/wikitext2.toml" in out and "--gpus all" in out
    assert "--max-trials N run at most N trials from this command, split over its processes" in out


# ---- trials that fail, in process --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_a_trial_that_raises_fails_with_its_reason_and_a_nan_prunes_while_the_worker_goes_on(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import koopman_search.trainer.loop  # noqa: F401 - trainer.loop below
    from koopman_search import trainer

    base = {"koopman_weight_max": 0.1, "koopman_start_epoch": 2, "fallback_threshold": 8.0, "schedule": "linear"}
    study = write_study(
        tmp_path, postgres_url, n_trials=3, dims=(8, 16, 32), enqueue=[{**base, "koopman_dim": d} for d in (8, 16, 32)]
    )
    real_heads = trainer.loop.KoopmanHeads
    real_evaluate = trainer.loop.HybridKoopmanTrainer.evaluate

    def heads(cfg: Any, *args: Any) -> Any:
        if cfg.dim == 8:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_heads(cfg, *args)

    def evaluate(self: Any, koopman: bool = True) -> dict[str, Any]:
        val = real_evaluate(self, koopman)
        return {**val, "val_loss": float("nan")} if koopman and self.cfg.koopman.dim == 16 else val

    monkeypatch.setattr(trainer.loop, "KoopmanHeads", heads)
    monkeypatch.setattr(trainer.loop.HybridKoopmanTrainer, "evaluate", evaluate)
    assert main(["create", str(study)]) == 0
    summary = run_worker(load_spec(study))
    assert [o.state for o in summary.outcomes] == ["FAIL", "PRUNED", "COMPLETE"]
    trials = open_study(postgres_url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    assert trials[0].user_attrs["fail_reason"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "val_loss" in trials[1].user_attrs["prune_reason"] and trials[1].user_attrs["pruned_epoch"] == 3
    assert_study_done(trials, 3)


@pytest.mark.slow
def test_a_trial_failed_elsewhere_while_it_runs_is_dropped_and_the_worker_goes_on(tmp_path: Path) -> None:
    # what happens when the database is out of reach for longer than the grace period: another worker finds
    # the trial stale, fails it and queues a retry, while the worker running it carries on
    base = {"koopman_weight_max": 0.1, "koopman_start_epoch": 1, "fallback_threshold": 8.0, "schedule": "linear"}
    study_file = write_study(
        tmp_path, f"sqlite:///{tmp_path / 'w.db'}", n_trials=2, enqueue=[{**base, "koopman_dim": d} for d in (8, 16)]
    )
    assert main(["create", str(study_file)]) == 0
    storage = open_storage(load_spec(study_file).storage_url, heartbeat=False)
    study = optuna.load_study(study_name="w", storage=storage)

    def fail_trial_0_elsewhere(number: int, record: Any) -> None:
        if number == 0 and record.epoch == 2:
            storage.set_trial_state_values(study.trials[0]._trial_id, state=TrialState.FAIL)

    summary = run_worker(load_spec(study_file), on_epoch=fail_trial_0_elsewhere)
    assert [(o.number, o.state) for o in summary.outcomes] == [(0, "FAIL"), (1, "COMPLETE")]
    assert "UpdateFinishedTrialError" in (summary.outcomes[0].reason or "")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trial_attrs(trials[0])["records"]["epoch"] == [1, 2]  # nothing written after it was failed
    assert "fail_reason" not in trials[0].user_attrs


# ---- shared warmup equals training from scratch ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_shared_warmup_gives_the_records_of_training_from_scratch_and_status_counts_the_saved_epochs(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    params = {
        "koopman_weight_max": 0.2,
        "koopman_start_epoch": 2,
        "fallback_threshold": 8.0,
        "schedule": "linear",
        "koopman_dim": 16,
    }
    records: dict[bool, dict[str, list[Any]]] = {}
    saved: dict[bool, int] = {}
    for shared in (True, False):
        name = "warm" if shared else "cold"
        study = write_study(tmp_path, postgres_url, name=name, n_trials=1, shared_warmup=shared, enqueue=[params])
        assert main(["create", str(study)]) == 0
        (outcome,) = run_worker(load_spec(study)).outcomes
        assert outcome.state == "COMPLETE"
        assert (outcome.epochs_run, outcome.epochs_from_warmup) == ((1, 2) if shared else (3, 0))
        (trial,) = open_study(postgres_url, name).get_trials()
        records[shared] = trial_attrs(trial)["records"]
        capsys.readouterr()
        assert main(["status", str(study), "--format", "json"]) == 0
        saved[shared] = json.loads(capsys.readouterr().out)["totals"]["epochs_saved_by_warmup"]
    timing = {"seconds", "tokens_per_s"}
    assert records[True]["epoch"] == [1, 2, 3]
    assert {k: v for k, v in records[True].items() if k not in timing} == {
        k: v for k, v in records[False].items() if k not in timing
    }
    assert saved == {True: 2, False: 0}


# ---- several processes on one study (PostgreSQL) -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_three_worker_processes_on_two_supervisors_run_exactly_the_budget(
    tmp_path: Path,
    postgres_url: str,
    worker_env: dict[str, str],
    processes: list[subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    study = write_study(tmp_path, postgres_url, n_trials=6, slow=True)
    assert main(["create", str(study)]) == 0
    other = Worker(study, ["--workers", "1"], worker_env, "other", processes)  # as on a second machine
    assert main(["launch", str(study), "--workers", "2"]) == 0
    assert other.wait() == 0, other.err[-3000:]
    trials = open_study(postgres_url).get_trials()
    assert_study_done(trials, 6)
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) >= 2
    baseline = open_study(postgres_url, "w.baseline-seed0").get_trials()
    assert [t.state for t in baseline] == [TrialState.COMPLETE]  # run once, by one of the three
    out = capsys.readouterr().out
    finished = [line for line in (out + other.out).splitlines() if line.startswith("trial ")]
    assert sorted(int(line.split()[1]) for line in finished) == list(range(6))


@pytest.mark.slow
@pytest.mark.postgres
def test_a_worker_killed_mid_trial_is_retried_from_its_checkpoint_and_nothing_finished_is_lost(
    tmp_path: Path, postgres_url: str, worker_env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    # start epoch 1: a trial trains epochs 2..4 itself, checkpointing after each
    study = write_study(tmp_path, postgres_url, n_trials=4, epochs=4, start_epoch=1, slow=True)
    assert main(["create", str(study)]) == 0
    supervisor = Worker(study, ["--workers", "2"], worker_env, "supervisor", processes)
    victim = wait_for(
        running_with_checkpoint(postgres_url, (2,)), "a trial with a checkpoint to resume", alive=[supervisor]
    )
    before = {t.number: (t.state, t.values) for t in open_study(postgres_url).get_trials() if t.state.is_finished()}
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)

    assert supervisor.wait() == 0, supervisor.err[-3000:]
    trials = open_study(postgres_url).get_trials()
    assert_study_done(trials, 4)
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = retries_of(trials, victim.number)
    assert retry.state == TrialState.COMPLETE
    assert retry.params == victim.params
    assert retry.user_attrs["epochs_resumed"] >= trial_attrs(victim)["checkpoint"]["epoch"] >= 2
    assert trial_attrs(retry)["records"]["epoch"] == [1, 2, 3, 4]
    assert {t.number for t in originals(trials) if t.state != TrialState.COMPLETE} == {victim.number}
    assert {n: (trials[n].state, trials[n].values) for n in before} == before
    assert "slot" in supervisor.err and "was killed by SIGKILL; starting it again in 1 s" in supervisor.err


@pytest.mark.slow
@pytest.mark.postgres
def test_sigterm_stops_every_slot_after_its_epoch_and_a_later_run_resumes_the_trial(
    tmp_path: Path, postgres_url: str, worker_env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    # 5 epochs, and the signal after epoch 2: the trial is stopped after epoch 3, or after 4 if the request
    # comes late, but never reaches its last epoch
    study = write_study(tmp_path, postgres_url, n_trials=3, epochs=5, start_epoch=1, slow=True)
    assert main(["create", str(study)]) == 0
    supervisor = Worker(study, ["--workers", "2"], worker_env, "supervisor", processes)
    wait_for(running_with_checkpoint(postgres_url, (2,)), "a trial in the middle of its epochs", alive=[supervisor])
    supervisor.proc.send_signal(signal.SIGTERM)

    assert supervisor.wait(timeout=60) == 0, supervisor.err[-3000:]
    err = supervisor.err
    assert "stopping: each slot finishes its epoch" in err
    assert {"slot 0 (CPU): stopped", "slot 1 (CPU): stopped"} <= {line[9:] for line in err.splitlines()}
    assert "exited with status" not in err and "killed by" not in err
    trials = open_study(postgres_url).get_trials()
    assert [t.number for t in trials if t.state == TrialState.RUNNING] == []
    stopped = [t for t in trials if "interrupted" in (t.user_attrs.get("fail_reason") or "")]
    assert stopped and {t.state for t in stopped} == {TrialState.FAIL}
    for t in stopped:
        epoch = int(t.user_attrs["fail_reason"].split("after epoch ")[1].split(";")[0])
        assert trial_attrs(t)["checkpoint"]["epoch"] == epoch == trial_attrs(t)["records"]["epoch"][-1]
        (retry,) = retries_of(trials, t.number)
        assert retry.state == TrialState.WAITING and trial_attrs(retry)["checkpoint"]["epoch"] == epoch
        assert "fail_reason" not in retry.user_attrs  # the reason stays with the stopped attempt

    run_worker(load_spec(study))  # a later run, here in this process
    trials = open_study(postgres_url).get_trials()
    assert_study_done(trials, 3)
    for t in stopped:
        (retry,) = retries_of(trials, t.number)
        assert retry.state == TrialState.COMPLETE
        assert retry.user_attrs["epochs_resumed"] == trial_attrs(t)["checkpoint"]["epoch"] >= 2
        assert trial_attrs(retry)["records"]["epoch"] == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.postgres
def test_a_worker_survives_its_database_connections_being_killed(
    tmp_path: Path, postgres_url: str, worker_env: dict[str, str], processes: list[subprocess.Popen[bytes]]
) -> None:
    study = write_study(tmp_path, postgres_url, n_trials=3, epochs=4, start_epoch=1, slow=True)
    assert main(["create", str(study)]) == 0
    supervisor = Worker(study, ["--workers", "1"], worker_env, "supervisor", processes)
    wait_for(running_with_checkpoint(postgres_url, (2, 3)), "a running trial", alive=[supervisor])
    database = sqlalchemy.engine.make_url(postgres_url).database
    admin = sqlalchemy.create_engine(postgres_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    killed = 0
    try:
        for _ in range(3):
            with admin.connect() as conn:
                killed += len(
                    conn.execute(
                        sqlalchemy.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": database},
                    ).all()
                )
            time.sleep(0.7)
    finally:
        admin.dispose()
    assert killed >= 3

    assert supervisor.wait() == 0, supervisor.err[-3000:]
    assert "exited with status" not in supervisor.err and "killed by" not in supervisor.err
    trials = open_study(postgres_url).get_trials()
    assert_study_done(trials, 3)
    assert {t.state for t in originals(trials)} == {TrialState.COMPLETE}


def test_slots_get_the_allocator_koopman_malloc_asks_for(tmp_path: Path) -> None:
    command = fake_worker(
        tmp_path,
        """
        mark(f"{os.environ.get('KOOPMAN_MALLOC')} {os.environ.get('GLIBC_TUNABLES', '-')}")
        emit("exit", reason="queue empty")
    """,
    )
    env = {**os.environ, "KOOPMAN_MALLOC": "glibc-tuned"}
    code = Supervisor(
        tiny_spec(tmp_path),
        plan_slots([], 1),
        out=io.StringIO(),
        err=io.StringIO(),
        live=False,
        command=command,
        env=env,
    ).run()
    assert code == 0
    assert marks(tmp_path) == [f"glibc-tuned {GLIBC_TUNED}"]


def test_an_unknown_allocator_stops_the_supervisor_before_any_slot(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"KOOPMAN_MALLOC must be one of glibc, glibc-tuned, jemalloc, but got "
        r"KOOPMAN_MALLOC='tcmalloc'",
    ):
        Supervisor(tiny_spec(tmp_path), plan_slots([], 1), env={"KOOPMAN_MALLOC": "tcmalloc"})
