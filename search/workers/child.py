"""One worker process (``python -m search.workers``), started by the supervisor: reads its job from stdin,
runs :func:`koopman_search.search.workers.loop.run_worker`, reports events on stdout."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import IO, Any

from koopman_search.search.errors import BaselineError, StorageError, StudyNotFoundError
from koopman_search.search.settings import RuntimeSettings, configure_logging, configured
from koopman_search.search.studyfile.spec import spec_from_dict
from koopman_search.search.workers import events
from koopman_search.search.workers.events import EXIT_FATAL, EXIT_OUTAGE, EventWriter
from koopman_search.trainer.errors import ConfigError, KoopmanError

__all__ = ["child_main"]

logger = logging.getLogger(__name__)


def _stop_on_signals(stop: threading.Event) -> None:
    """The first SIGTERM/SIGINT sets ``stop`` (the trial ends after its epoch and is handed back); the
    second raises KeyboardInterrupt (handed back at once, from the previous checkpoint)."""
    received = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal received
        received += 1
        stop.set()
        if received > 1:
            raise KeyboardInterrupt(f"signal {signum} received twice")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _watch_supervisor(stdin: IO[str], stop: threading.Event) -> None:
    """The supervisor keeps our stdin open while it lives: end of file means it is gone."""
    for _ in stdin:
        pass
    if not stop.is_set():
        logger.warning("the supervisor is gone: stopping after this epoch")
        stop.set()


def child_main() -> int:
    """Read the job from stdin, run :func:`~search.workers.loop.run_worker`, report on stdout. Exit 0 when
    done or stopped, :data:`~search.workers.events.EXIT_FATAL` for an error a restart cannot fix, 1 for any
    other error."""
    line = sys.stdin.readline()
    if not line.strip():
        print(
            "koopman_search.search.workers: expects a job on stdin; start workers with `koopman-search worker`",
            file=sys.stderr,
        )
        return EXIT_FATAL
    job = json.loads(line)
    from optuna.exceptions import ExperimentalWarning

    # the storage uses Optuna's heartbeat options, which Optuna marks experimental; say it once, not per slot
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    writer = EventWriter(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)  # stray prints (or C libraries) go to stderr, never into the event stream
    # Optuna's own lines in the same format, at its default level
    configure_logging(job.get("log_level") or "INFO", logging.INFO)

    stop = threading.Event()
    _stop_on_signals(stop)
    threading.Thread(target=_watch_supervisor, args=(sys.stdin, stop), daemon=True, name="supervisor-watch").start()
    writer.emit(events.READY, pid=os.getpid(), device=job["device"])

    if job.get("threads"):
        from koopman_search.trainer.threads import set_torch_threads

        set_torch_threads(int(job["threads"]))  # the slot's share of the cores, before any torch work
    try:
        with configured(RuntimeSettings.from_environment()):  # the KOOPMAN_* settings, read once
            summary = _run(job, writer, stop)
    except KeyboardInterrupt:
        writer.emit(events.EXIT, reason="stopped at once")
        return 0
    except KoopmanError as exc:
        if stop.is_set():  # e.g. stopped while the baseline ran or was waited for
            writer.emit(events.EXIT, reason="stopped")
            return 0
        logger.error("%s", exc)
        if isinstance(exc, StorageError):
            return EXIT_OUTAGE  # the supervisor starts it again, without counting it as a crash
        fatal = isinstance(exc, (ConfigError, BaselineError, StudyNotFoundError))
        return EXIT_FATAL if fatal else 1
    n = summary.counted
    if summary.interrupted:
        reason = "stopped"
    elif job.get("max_trials") is not None and n >= job["max_trials"]:
        reason = f"ran its {n} trial(s) (--max-trials)"
    else:
        reason = f"queue empty, {n} trial(s) run"
    writer.emit(events.EXIT, reason=reason)
    return 0


def _run(job: dict[str, Any], writer: EventWriter, stop: threading.Event) -> Any:
    """The job's worker loop, its outcomes and epochs sent to the supervisor as events; its summary."""
    from koopman_search.search.engine.runner import TrialOutcome, format_outcome
    from koopman_search.search.workers.loop import run_worker
    from koopman_search.search.workers.progress import epoch_fields

    spec = spec_from_dict(job["spec"], origin=job.get("path") or "study")
    spec = dataclasses.replace(
        spec, path=Path(job["path"]) if job.get("path") else None, storage_url=job["storage_url"]
    ).with_device(job["device"])

    def on_outcome(o: TrialOutcome) -> None:
        writer.emit(
            events.OUTCOME,
            number=o.number,
            state=o.state,
            reason=o.reason,
            line=format_outcome(o, spec.metrics),
            requeued=o.requeued,
            lost=o.lost,
        )

    return run_worker(
        spec,
        seed_offset=int(job.get("seed_offset", 0)),
        max_trials=job.get("max_trials"),
        stop=stop,
        on_outcome=on_outcome,
        on_trial_start=lambda number: writer.emit(events.TRIAL, number=number),
        on_epoch=lambda number, r: writer.emit(events.EPOCH, number=number, **epoch_fields(r)),
        on_baseline_epoch=lambda r: writer.emit(events.BASELINE_EPOCH, **epoch_fields(r)),
        on_step=_steps_to(writer),
    )


def _steps_to(writer: EventWriter) -> Any:
    """``on_step`` for run_worker: a STEP event every :data:`events.STEP_EVERY_S` at most (the epoch's last step
    is left to its EPOCH event)."""
    last = [time.monotonic()]

    def on_step(number: int | None, epoch: int, epochs: int, step: int, steps: int) -> None:
        now = time.monotonic()
        if step < steps and now - last[0] >= events.STEP_EVERY_S:
            last[0] = now
            writer.emit(events.STEP, number=number, epoch=epoch, epochs=epochs, step=step, steps=steps)

    return on_step
