"""The terminal board: one status line per slot and the n/N trials line on stderr, finished trials on stdout."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from koopman_search.search.workers.progress import TrialsProgress, epoch_text, format_duration, trial_eta
from koopman_search.search.workers.slots import Slot

__all__ = ["Board", "BoardHandler", "SlotRun"]


@dataclass
class SlotRun:
    """One slot as the supervisor follows it: its current process, its counts and its status line."""

    slot: Slot
    share: int | None  # trials this slot may start, all its processes together (None: no cap)
    proc: subprocess.Popen[str] | None = None
    readers: list[threading.Thread] = field(default_factory=list)
    status: str = "starting"
    started: int = 0  # trials claimed
    finished: int = 0  # trials that reached an outcome
    crashes: int = 0  # unexpected exits in a row
    current: int | None = None  # the number of the trial its process runs now
    outages: int = 0  # exits for a database out of reach, in a row (they never give the slot up)
    restart_at: float | None = None
    signalled: int = 0  # stop requests passed on to the current process
    done: bool = False
    failed: bool = False


class Board:
    """One status line per slot on stderr, and under them the n/N trials line with the run's ETA
    (:class:`~search.workers.progress.TrialsProgress`). On a terminal the lines stay at the bottom and are
    redrawn in place, with log lines and finished trials printed above them; otherwise each change is one
    line, and the n/N line follows each finished trial."""

    def __init__(self, runs: Sequence[SlotRun], out: TextIO, err: TextIO, live: bool) -> None:
        self._runs = runs
        self._out = out
        self._err = err
        self.live = live
        self._drawn = 0
        self._lock = threading.RLock()
        self.trials = TrialsProgress(parallel=max(1, len(runs)))

    def epoch_status(self, event: Mapping[str, Any]) -> str:
        """A slot's status after an epoch event: ``epoch 2/4  val_ppl 512.3 ...  ETA 12 s``."""
        if "number" in event:
            eta = self.trials.epoch(event["number"], event)
        else:  # the baseline
            eta = trial_eta(event)
        return f"epoch {event['epoch']}/{event['epochs']}  {epoch_text(event)}  ETA {format_duration(eta)}"

    def step_status(self, event: Mapping[str, Any]) -> str:
        """A slot's status inside an epoch: ``epoch 2/4 step 120/509  ETA 3 min 2 s``."""
        epoch, epochs, step, steps = (int(event[k]) for k in ("epoch", "epochs", "step", "steps"))
        eta = self.trials.step(event.get("number"), epoch, epochs, step, steps)
        return f"epoch {epoch}/{epochs} step {step}/{steps}  ETA {format_duration(eta)}"

    def _line(self, run: SlotRun) -> str:
        return f"{run.slot.label}: {run.status}"

    def _clear(self) -> None:
        if self._drawn:
            self._err.write(f"\x1b[{self._drawn}F\x1b[J")  # to the board's first line, erase to the end
            self._drawn = 0

    def _draw(self) -> None:
        # one terminal row per slot, or moving back up over the board would miss the wrapped part
        width = max(20, shutil.get_terminal_size().columns - 1)
        for run in self._runs:
            self._err.write(self._line(run)[:width] + "\n")
        self._err.write(self.trials.line()[:width] + "\n")
        self._drawn = len(self._runs) + 1
        self._err.flush()

    def update(self, run: SlotRun, status: str) -> None:
        with self._lock:
            if status == run.status:
                return
            run.status = status
            if self.live:
                self._clear()
                self._draw()
            else:  # a log file: each change on a line of its own, with the time
                self._err.write(f"{time.strftime('%H:%M:%S')} {self._line(run)}\n")
                self._err.flush()

    def log(self, text: str) -> None:
        """A log line (of a slot, or of the supervisor) on stderr."""
        with self._lock:
            if self.live:
                self._clear()
            self._err.write(text.rstrip("\n") + "\n")
            if self.live:
                self._draw()
            self._err.flush()

    def result(self, text: str, number: int | None = None) -> None:
        """A finished trial's line on stdout (trial ``number`` counts as done)."""
        with self._lock:
            if number is not None:
                self.trials.finished(number)
            if self.live:
                self._clear()
                self._err.flush()
            self._out.write(text + "\n")
            self._out.flush()
            if self.live:
                self._draw()
            elif number is not None:
                self._err.write(f"{time.strftime('%H:%M:%S')} {self.trials.line()}\n")
                self._err.flush()

    def close(self) -> None:
        with self._lock:
            if self.live:  # leave the final state on screen, as plain lines
                self._clear()
                self._draw()
                self._drawn = 0


class BoardHandler(logging.Handler):
    """The supervisor's own log records, printed through the board so that they do not tear it."""

    def __init__(self, board: Board, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self._board = board
        if formatter is not None:
            self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._board.log(self.format(record))
        except Exception:  # logging must never raise; the standard handlers do the same
            self.handleError(record)
