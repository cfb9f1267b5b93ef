"""The events a worker process sends its supervisor: one JSON object per line on the child's stdout.

Both ends name them through these constants; each event carries ``"event"`` and the fields listed.
"""

from __future__ import annotations

import json
import threading
from typing import Any, TextIO

__all__ = [
    "BASELINE_EPOCH",
    "EPOCH",
    "EVENT_KEY",
    "EXIT",
    "EXIT_FATAL",
    "EXIT_OUTAGE",
    "OUTCOME",
    "READY",
    "TRIAL",
    "EventWriter",
]

EXIT_FATAL = 3  # a worker process's exit status for an error that a restart cannot fix: not started again
EXIT_OUTAGE = 75  # the database stayed out of reach: started again, however often (EX_TEMPFAIL)

EVENT_KEY = "event"
READY = "ready"  # pid, device: the process is up; the baseline (or the wait for it) comes next
TRIAL = "trial"  # number: a trial was claimed
EPOCH = "epoch"  # number and koopman_search.search.workers.progress.epoch_fields: a trial finished an epoch
BASELINE_EPOCH = "baseline_epoch"  # epoch_fields: the baseline finished an epoch
STEP = "step"  # number (None: the baseline), epoch, epochs, step, steps: inside an epoch, every STEP_EVERY_S at most
STEP_EVERY_S = 1.0
OUTCOME = "outcome"  # number, state, reason, line: a trial ended
EXIT = "exit"  # reason: the process is about to exit 0


class EventWriter:
    """JSON events to the supervisor, one per line, on the process's original stdout."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._gone = False

    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            if self._gone:
                return
            try:
                self._stream.write(json.dumps({EVENT_KEY: event, **fields}) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # the supervisor is gone; end of file on stdin stops us too
                self._gone = True
