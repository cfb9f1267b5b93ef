"""Live progress of a worker: each trial's start, one line per epoch with the record's key numbers and the
trial's ETA, and the n/N trials line with the whole run's ETA.

The same numbers drive both views: :class:`LiveProgress` in a single-process ``launch`` (tqdm bars redrawn
in place on a terminal, one timestamped line per event in a log or a pipe), and the multi-process board
(:mod:`search.workers.board`), which gets them as :data:`search.workers.events.EPOCH` events.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from koopman_search.search.text import number
from koopman_search.trainer.records import EpochRecord

__all__ = [
    "EPOCH_FIELDS",
    "LiveProgress",
    "TrialsProgress",
    "epoch_fields",
    "epoch_text",
    "format_duration",
    "is_live",
]

# the record's numbers an epoch line shows, in this order (the shipped objectives first; docs/design.md)
EPOCH_FIELDS = ("val_ppl", "val_koopman_forward_ppl", "total_loss", "lm_loss", "koopman_loss", "effective_weight")


FALLBACK_COLUMNS = 100  # the bars' width where the terminal reports none
STEP_REDRAW_S = 0.5  # the epoch bar follows the steps at most this often on a terminal
STEP_LINE_S = 60.0  # and in a log or a pipe, one line about the steps at most this often


def is_live(stream: TextIO) -> bool:
    """A terminal that can redraw lines in place (not a log file, a pipe or TERM=dumb)."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
    except (AttributeError, ValueError):
        return False


def epoch_fields(record: EpochRecord) -> dict[str, Any]:
    """What one epoch event carries: epoch, epochs, seconds and :data:`EPOCH_FIELDS` (NaN as None)."""
    out: dict[str, Any] = {"epoch": record.epoch, "epochs": record.epochs, "seconds": _finite(record.seconds)}
    koopman_on = record.koopman_weight > 0
    for name in EPOCH_FIELDS:
        # the Koopman loss and its weight are 0 while it is off: shown as unknown, like the Koopman metrics
        off = name in ("koopman_loss", "effective_weight") and not koopman_on
        out[name] = None if off else _finite(getattr(record, name))
    return out


def format_duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def epoch_text(fields: Mapping[str, Any]) -> str:
    """The key numbers of one epoch event: ``val_ppl 512.3  val_koopman_forward_ppl 640.1  ...``
    (the Koopman numbers are left out where they are None, i.e. while the Koopman loss is off)."""
    parts = []
    for name in EPOCH_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        parts.append(f"{name} {number(value)}")
    return "  ".join(parts)


def trial_eta(fields: Mapping[str, Any]) -> float | None:
    """Seconds left in a trial after this epoch: its epoch time × the epochs still to run."""
    seconds = fields.get("seconds")
    if seconds is None:
        return None
    return float(seconds) * max(0, int(fields["epochs"]) - int(fields["epoch"]))


@dataclass
class _Running:
    started: float
    eta: float | None = None  # seconds left after its last epoch
    at: float = 0.0  # when that estimate was made
    per_epoch: float | None = None
    epochs: int | None = None
    step_mark: tuple[int, int, float] | None = None  # (epoch, step, time) of the first step seen in an epoch


@dataclass
class TrialsProgress:
    """The n/N trials count and the run's ETA, for ``parallel`` trials at a time.

    ``total`` is the number of trials this run expects (the study's WAITING trials when it starts, at
    most the ``--max-trials`` cap); None when unknown. A trial estimates its own remaining time from its
    epoch times; the trials not yet started take the mean duration of those finished here (or, before
    any has finished, a running trial's epoch time × its epochs)."""

    total: int | None = None
    parallel: int = 1
    clock: Callable[[], float] = time.monotonic
    done: int = 0
    durations: list[float] = field(default_factory=list)
    running: dict[int, _Running] = field(default_factory=dict)
    baseline: _Running | None = None  # the matched baseline while it runs here: its epochs time a trial's

    def baseline_epoch(self, fields: Mapping[str, Any]) -> None:
        """Note an epoch of the baseline: its time left comes before the trials', and until a trial has an
        epoch of its own, a trial is guessed as long as the baseline (the same model, epochs and data)."""
        run = self.baseline or _Running(self.clock())
        run.eta, run.at = trial_eta(fields), self.clock()
        run.per_epoch, run.epochs = fields.get("seconds"), int(fields["epochs"])
        self.baseline = run

    def step(self, number: int | None, epoch: int, epochs: int, step: int, steps: int) -> float | None:
        """Note a step inside an epoch (``number`` None: the baseline's); returns that run's ETA in seconds.
        Before a run has finished an epoch, its epoch time is guessed from its steps so far."""
        now = self.clock()
        if number is None:
            run = self.baseline = self.baseline or _Running(now)
        else:
            run = self.running.setdefault(number, _Running(now))
        if run.step_mark is None or run.step_mark[0] != epoch:
            run.step_mark = (epoch, step, now)
        _, first_step, first_at = run.step_mark
        per_epoch = run.per_epoch
        if per_epoch is None and step > first_step:
            per_epoch = (now - first_at) / (step - first_step) * steps
        run.epochs = epochs
        if per_epoch is None:
            return None
        run.per_epoch = run.per_epoch or per_epoch
        run.eta, run.at = per_epoch * ((epochs - epoch) + (1 - step / max(steps, 1))), now
        return run.eta

    def started(self, number: int) -> None:
        self.running[number] = _Running(self.clock())
        if self.baseline is not None:  # trials start here once the baseline is done (or runs elsewhere)
            self.baseline.eta = 0.0

    def epoch(self, number: int, fields: Mapping[str, Any]) -> float | None:
        """Note an epoch event; returns the trial's ETA in seconds."""
        run = self.running.setdefault(number, _Running(self.clock()))
        run.eta, run.at = trial_eta(fields), self.clock()
        run.per_epoch, run.epochs = fields.get("seconds"), int(fields["epochs"])
        return run.eta

    def finished(self, number: int) -> None:
        run = self.running.pop(number, None)
        self.done += 1
        if run is not None:
            self.durations.append(self.clock() - run.started)
        if self.total is not None and self.done > self.total:  # a retry was queued meanwhile
            self.total = self.done

    def eta(self) -> float | None:
        """Seconds until every expected trial has finished; None while nothing can be estimated."""
        if self.total is None:
            return None
        now = self.clock()
        if self.durations:
            per_trial: float | None = sum(self.durations) / len(self.durations)
        else:
            guesses = [r.per_epoch * r.epochs for r in self.running.values() if r.per_epoch and r.epochs]
            if not guesses and self.baseline is not None and self.baseline.per_epoch and self.baseline.epochs:
                guesses = [self.baseline.per_epoch * self.baseline.epochs]
            per_trial = max(guesses) if guesses else None
        ahead = 0.0  # the baseline's time left, when it is still running here
        if self.baseline is not None and self.baseline.eta is not None:
            ahead = max(0.0, self.baseline.eta - (now - self.baseline.at))
        left_running = []
        for run in self.running.values():
            if run.eta is not None:
                left_running.append(max(0.0, run.eta - (now - run.at)))
            elif per_trial is not None:  # no epoch finished yet: a trial as long as the others
                left_running.append(max(0.0, per_trial - (now - run.started)))
            else:
                return None
        waiting = max(0, self.total - self.done - len(self.running))
        if waiting and per_trial is None:
            return None
        slots = max(1, self.parallel)
        return ahead + max(left_running, default=0.0) + math.ceil(waiting / slots) * (per_trial or 0.0)

    def line(self) -> str:
        """``trials 3/8 done, 1 running, ETA 4 min 10 s``."""
        total = "?" if self.total is None else str(self.total)
        running = f", {len(self.running)} running" if self.running else ""
        return f"trials {self.done}/{total} done{running}, ETA {format_duration(self.eta())}"


class LiveProgress:
    """The progress of a single-process worker, as callbacks for :func:`koopman_search.search.workers.run_worker`.

    On a terminal (``live``) two tqdm bars at the bottom of stderr: the run's trials (n/N, ETA) and the
    current trial's epochs (its key numbers, ETA), with finished trials printed above them on stdout and
    log records above them on stderr. Otherwise one timestamped line on stderr per event (the baseline's
    and each trial's start, every epoch, the n/N line after each trial) and each finished trial's line on
    stdout."""

    def __init__(
        self,
        total: int | None,
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        format_outcome: Callable[[Any], str] = str,
        ncols: int | None = None,
    ) -> None:
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self.live = is_live(self._err) if live is None else live
        self.trials = TrialsProgress(total=total, clock=clock)
        self._format_outcome = format_outcome
        self._bars: tuple[Any, Any] | None = None
        self._ncols = ncols
        self._clock = clock
        self._texts: dict[int | None, str] = {}  # each run's last epoch line, shown beside its step count
        self._step_shown = clock()  # when a step was last drawn (live) or a line written (a log)

    # -- output ------------------------------------------------------------------------------------------
    def _line(self, text: str) -> None:
        if self._bars is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self._err)
            return
        self._err.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self._err.flush()
        self._step_shown = self._clock()  # a step line only after STEP_LINE_S with no other line

    def _ensure_bars(self) -> tuple[Any, Any]:
        if self._bars is None:
            from tqdm import tqdm

            # a terminal that reports no size (0 × 0: a serial console, some container runtimes) still gets bars
            ncols = self._ncols or shutil.get_terminal_size().columns or FALLBACK_COLUMNS
            overall = tqdm(
                total=self.trials.total,
                desc=self.trials.line(),
                file=self._err,
                position=0,
                leave=True,
                ncols=ncols,
                bar_format="|{bar:20}| {desc}",
            )
            epochs = tqdm(
                total=1, desc="", file=self._err, position=1, leave=False, ncols=ncols, bar_format="|{bar:20}| {desc}"
            )
            self._bars = (overall, epochs)
        return self._bars

    def _redraw(self, text: str, epoch: float = 0, epochs: int = 1) -> None:
        overall, bar = self._ensure_bars()
        overall.total, overall.n = self.trials.total, self.trials.done
        overall.set_description_str(self.trials.line(), refresh=False)
        overall.refresh()
        bar.total, bar.n = epochs, epoch
        bar.set_description_str(text, refresh=False)
        bar.refresh()

    @contextmanager
    def session(self) -> Iterator[LiveProgress]:
        """Around the run: on a terminal, log records go above the bars (tqdm's own logging redirect)."""
        if not self.live:
            yield self
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._ensure_bars()
        try:
            with logging_redirect_tqdm():
                yield self
        finally:
            self.close()

    def close(self) -> None:
        if self._bars is not None:
            overall, bar = self._bars
            bar.close()
            overall.n = self.trials.done
            overall.set_description_str(self.trials.line(), refresh=False)
            overall.close()
            self._bars = None

    # -- the callbacks of run_worker -------------------------------------------------------------------
    def on_baseline_epoch(self, record: EpochRecord) -> None:
        fields = epoch_fields(record)
        self.trials.baseline_epoch(fields)
        self._texts[None] = epoch_text(fields)
        text = f"epoch {record.epoch}/{record.epochs}  {epoch_text(fields)}  ETA {format_duration(trial_eta(fields))}"
        if self.live:
            self._redraw(f"baseline {text}", record.epoch, record.epochs)
        else:
            self._line(f"baseline {text} ({self.trials.line()})")

    def on_step(self, number: int | None, epoch: int, epochs: int, step: int, steps: int) -> None:
        """A step inside an epoch: the epoch bar moves with it (redrawn at most every
        :data:`STEP_REDRAW_S`); in a log, a line once :data:`STEP_LINE_S` passed without one."""
        eta = self.trials.step(number, epoch, epochs, step, steps)
        now = self._clock()
        if now - self._step_shown < (STEP_REDRAW_S if self.live else STEP_LINE_S) and step < steps:
            return
        self._step_shown = now
        who = "baseline" if number is None else f"trial {number}"
        where = f"epoch {epoch}/{epochs} step {step}/{steps}"
        if self.live:
            last = self._texts.get(number)
            text = f"{who} {where}  ETA {format_duration(eta)}" + (f"  (last: {last})" if last else "")
            self._redraw(text, epoch - 1 + step / max(steps, 1), epochs)
        elif step < steps:  # the epoch's own line follows its last step
            self._line(f"{who} {where}, ETA {format_duration(eta)} ({self.trials.line()})")

    def on_trial_start(self, number: int) -> None:
        self.trials.started(number)
        if self.live:
            self._redraw(f"trial {number} starting")
        else:
            self._line(f"trial {number} started ({self.trials.line()})")

    def on_epoch(self, number: int, record: EpochRecord) -> None:
        fields = epoch_fields(record)
        eta = self.trials.epoch(number, fields)
        self._texts[number] = epoch_text(fields)
        text = f"epoch {record.epoch}/{record.epochs}  {epoch_text(fields)}  ETA {format_duration(eta)}"
        if self.live:
            self._redraw(f"trial {number} {text}", record.epoch, record.epochs)
        else:
            self._line(f"trial {number} {text}")

    def on_outcome(self, outcome: Any) -> None:
        self.trials.finished(outcome.number)
        text = self._format_outcome(outcome)
        if self.live:
            from tqdm import tqdm

            tqdm.write(text, file=self._out)
            self._redraw(f"trial {outcome.number} {outcome.state}")
        else:
            self._out.write(text + "\n")
            self._out.flush()
            self._line(self.trials.line())


def _finite(value: float) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
