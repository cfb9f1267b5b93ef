"""Live progress: the epoch lines' numbers, the trial and run ETAs, and what `launch` prints while it runs."""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from koopman_search.search.workers.progress import (
    LiveProgress,
    TrialsProgress,
    epoch_fields,
    epoch_text,
    format_duration,
)
from koopman_search.trainer.records import EpochRecord
from tests.search.study_files import cli, logging_restored, write_study


def record(epoch: int, epochs: int = 4, seconds: float = 10.0, forward: float = 640.06) -> EpochRecord:
    return EpochRecord(
        epoch=epoch,
        epochs=epochs,
        lm_loss=6.2,
        koopman_loss=0.41,
        total_loss=6.25,
        koopman_weight=0.1,
        effective_weight=0.1,
        fallback_batches=0,
        nonfinite_batches=0,
        val_loss=6.24,
        val_ppl=512.34,
        val_koopman_nre=0.3,
        seconds=seconds,
        tokens_per_s=1000.0,
        steps=5,
        val_koopman_forward_ppl=forward,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _logging() -> Iterator[None]:
    with logging_restored():
        yield


def test_epoch_line_shows_both_objectives_and_leaves_out_the_koopman_numbers_while_it_is_off() -> None:
    on = epoch_text(epoch_fields(record(2)))
    assert on.startswith("val_ppl 512.34  val_koopman_forward_ppl 640.06  total_loss 6.25  lm_loss 6.2")
    off = epoch_text(epoch_fields(dataclasses.replace(record(1, forward=math.nan), koopman_weight=0.0)))
    assert off == "val_ppl 512.34  total_loss 6.25  lm_loss 6.2"


def test_durations_read_as_seconds_minutes_and_hours() -> None:
    assert [format_duration(s) for s in (None, math.nan, 42, 185, 3720)] == [
        "?",
        "?",
        "42 s",
        "3 min 05 s",
        "1 h 02 min",
    ]


def test_run_eta_is_the_running_trial_left_plus_the_waiting_trials_at_the_mean_duration() -> None:
    clock = Clock()
    trials = TrialsProgress(total=3, clock=clock)
    assert trials.line() == "trials 0/3 done, ETA ?"
    trials.started(0)
    clock.now = 10.0
    assert trials.epoch(0, epoch_fields(record(1, seconds=10.0))) == 30.0  # 3 epochs of 10 s left
    # before any trial has finished, a trial is guessed at its epoch time x its epochs: 30 + 2 x 40
    assert trials.eta() == 110.0
    clock.now = 40.0
    trials.finished(0)
    trials.started(1)
    assert trials.eta() == 80.0  # two more trials of the 40 s the first one took
    assert trials.line() == "trials 1/3 done, 1 running, ETA 1 min 20 s"


def test_the_first_epoch_is_timed_from_its_steps_before_it_ends() -> None:
    clock = Clock()
    trials = TrialsProgress(total=2, clock=clock)
    assert trials.step(None, 1, 4, 1, 100) is None  # one step: no rate yet
    clock.now = 5.0
    # the baseline: 10 more steps in 5 s, so 50 s an epoch; 89 steps of epoch 1 and 3 epochs left
    assert trials.step(None, 1, 4, 11, 100) == pytest.approx(50 * (3 + 0.89))
    assert trials.eta() == pytest.approx(50 * 3.89 + 2 * 50 * 4)  # then two trials timed as the baseline
    assert trials.line().endswith("ETA 9 min 54 s")


def test_steps_move_the_epoch_bar_on_a_terminal_and_write_a_line_a_minute_in_a_log() -> None:
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    live = LiveProgress(1, out=out, err=err, live=True, clock=clock, ncols=200)
    with live.session():
        live.on_trial_start(0)
        live.on_epoch(0, record(1))
        clock.now = 1.0
        live.on_step(0, 2, 4, 50, 100)
    screen = err.getvalue()
    # 1.5 of 4 epochs: the bar at 37.5%, with the last epoch's numbers beside the step count
    assert re.search(r"\|#{7}5 {12}\| trial 0 epoch 2/4 step 50/100  ETA 25 s  \(last: val_ppl 512\.34", screen)

    err = io.StringIO()
    clock.now = 1000.0
    log = LiveProgress(1, out=out, err=err, live=False, clock=clock)
    log.on_trial_start(0)
    for second in range(10, 130, 10):  # a step every 10 s for 2 minutes: a line after 60 s and 120 s quiet
        clock.now = 1000.0 + second
        log.on_step(0, 1, 4, second // 10, 100)
    steps = [line[9:] for line in err.getvalue().splitlines() if "step " in line]
    assert [s.split(",")[0] for s in steps] == ["trial 0 epoch 1/4 step 6/100", "trial 0 epoch 1/4 step 12/100"]


def test_a_retry_queued_meanwhile_raises_the_total_instead_of_showing_more_done_than_expected() -> None:
    trials = TrialsProgress(total=1, clock=Clock())
    for n in (0, 1):
        trials.started(n)
        trials.finished(n)
    assert trials.line().startswith("trials 2/2 done")


def test_in_a_log_every_event_is_one_timestamped_line_and_finished_trials_go_to_stdout() -> None:
    out, err, clock = io.StringIO(), io.StringIO(), Clock()
    progress = LiveProgress(
        2, out=out, err=err, live=False, clock=clock, format_outcome=lambda o: f"trial {o.number} | done"
    )
    progress.on_baseline_epoch(record(1, forward=math.nan))
    progress.on_trial_start(0)
    progress.on_epoch(0, record(3))
    clock.now = 20.0
    progress.on_outcome(SimpleNamespace(number=0, state="COMPLETE"))
    lines = err.getvalue().splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines)
    assert [line[9:] for line in lines] == [
        "baseline epoch 1/4  val_ppl 512.34  total_loss 6.25  lm_loss 6.2  koopman_loss 0.41  "
        "effective_weight 0.1  ETA 30 s (trials 0/2 done, ETA 1 min 50 s)",
        # before a trial has an epoch of its own, it is timed as the baseline: 10 s × 4 epochs
        "trial 0 started (trials 0/2 done, 1 running, ETA 1 min 20 s)",
        "trial 0 epoch 3/4  val_ppl 512.34  val_koopman_forward_ppl 640.06  total_loss 6.25  lm_loss 6.2  "
        "koopman_loss 0.41  effective_weight 0.1  ETA 10 s",
        "trials 1/2 done, ETA 20 s",
    ]
    assert out.getvalue() == "trial 0 | done\n"


def test_on_a_terminal_the_bars_are_redrawn_in_place_and_results_print_above_them() -> None:
    out, err = io.StringIO(), io.StringIO()
    progress = LiveProgress(
        2, out=out, err=err, live=True, clock=Clock(), format_outcome=lambda o: f"trial {o.number} | done", ncols=300
    )
    with progress.session():
        progress.on_trial_start(0)
        progress.on_epoch(0, record(2))
        progress.on_outcome(SimpleNamespace(number=0, state="COMPLETE"))
    screen = err.getvalue()
    assert "\r" in screen  # redrawn in place
    assert re.search(r"\|#{10} {10}\| trial 0 epoch 2/4  val_ppl 512\.34  val_koopman_forward_ppl 640\.06", screen)
    assert re.search(r"\|#{10} {10}\| trials 1/2 done, ETA ", screen)
    assert "\n" not in screen.split("trial 0 epoch 2/4")[0].split("\r")[-1]  # no line of its own: redrawn
    assert out.getvalue() == "trial 0 | done\n"


def test_launch_prints_the_baseline_each_trial_start_every_epoch_and_the_run_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path, n_trials=2, epochs=2, steps=2)
    code, out, err = cli(capsys, "launch", str(study))
    assert code == 0, err
    assert re.search(r"^\d\d:\d\d:\d\d baseline epoch 2/2  val_ppl \d", err, re.MULTILINE)
    assert re.search(r"^\d\d:\d\d:\d\d trial 0 started \(trials 0/2 done, 1 running", err, re.MULTILINE)
    # a trial with start epoch 1 trains epoch 2 itself (epoch 1 comes from the shared warmup)
    epoch_line = r"^\d\d:\d\d:\d\d trial \d epoch 2/2  val_ppl [\d.]+  val_koopman_forward_ppl [\d.]+ .*ETA 0 s$"
    assert len(re.findall(epoch_line, err, re.MULTILINE)) == 2
    assert re.search(r"^\d\d:\d\d:\d\d trials 2/2 done, ETA 0 s$", err, re.MULTILINE)
    assert "step " not in err  # epochs of 2 steps end long before a minute: no step lines in a log
    assert [line.split()[1] for line in out.splitlines() if " | COMPLETE " in line] == ["0", "1"]
    # each finished trial's dashboard note opens with its curves image, stored in the study's artifact store
    import optuna
    import optuna_dashboard

    stored = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}")
    attrs = stored._storage.get_study_system_attrs(stored._study_id)
    for trial in stored.trials:
        note = optuna_dashboard._note.get_note_from_system_attrs(attrs, trial._trial_id)["body"]
        image = note.splitlines()[2]
        assert image.startswith(f"![Trial {trial.number}: val perplexity")
        assert f"/artifacts/{stored._study_id}/" in image
        assert (tmp_path / "tiny-artifacts" / image.rsplit("/", 1)[1].rstrip(")")).is_file()


def test_a_terminal_that_reports_no_size_still_gets_its_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import shutil

    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((0, 0)))
    out, err = io.StringIO(), io.StringIO()
    progress = LiveProgress(2, out=out, err=err, live=True, clock=Clock(), format_outcome=lambda o: "done")
    with progress.session():
        progress.on_trial_start(0)
        progress.on_epoch(0, record(2))
    assert re.search(r"\|#{10} {10}\| trial 0 epoch 2/4  val_ppl 512\.34", err.getvalue())
