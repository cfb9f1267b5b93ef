"""Worker processes on one machine: one per GPU slot (or N on CPU), under one supervisor.

``koopman-search worker STUDY.toml --gpus 0,1 --trials-per-gpu 2`` starts this tree::

    supervisor (this process)                  status lines on stderr, finished trials on stdout
    ├── slot 0  python -m search.workers       CUDA_VISIBLE_DEVICES=0  device cuda
    ├── slot 1  python -m search.workers       CUDA_VISIBLE_DEVICES=0  device cuda
    ├── slot 2  python -m search.workers       CUDA_VISIBLE_DEVICES=1  device cuda
    └── slot 3  python -m search.workers       CUDA_VISIBLE_DEVICES=1  device cuda

Each slot runs :func:`search.runner.run_worker` in a fresh process (``subprocess``, not ``fork``, so CUDA
starts clean), pulling trials from the shared study until its queue is empty. The budget is the study's:
the same command on another machine with the same storage URL joins the same study.

How the supervisor and a slot talk:

* the supervisor writes one JSON line to the slot's stdin, the job (study, storage URL, device, trial
  cap), and keeps stdin open: end of file tells the slot that its supervisor is gone, and it stops as on
  SIGTERM;
* the slot writes JSON events to its stdout, one per line (``trial``, ``epoch``, ``outcome``, ...), and
  its logs to stderr; the supervisor reads both pipes with a thread each, keeps one status line per slot
  and prints each finished trial's line on stdout.

Signals: the first SIGTERM or SIGINT asks every slot to stop after its current epoch; the slot
checkpoints, hands its trial back to the queue (it resumes from that checkpoint on the next run) and exits
0, and so does the supervisor. A second signal stops the slots at once, each trial handed back from its
previous checkpoint. Slots run in their own session, so Ctrl-C in a terminal reaches the supervisor only.

A slot that dies unexpectedly (killed, out of memory, a crash) is started again after a pause that doubles
with each crash in a row (1 s, 2 s, 4 s, ... up to a minute), at most :data:`MAX_RESTARTS` times in a row;
its trial is failed by heartbeat and retried by whichever worker asks next. A slot that stops on an error
a restart cannot fix (a bad study file, a failed baseline, a missing study) is not started again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO, cast

from search.errors import BaselineError, SpecError, StudyNotFoundError
from search.spec import StudySpec, spec_from_dict
from trainer.alloc import allocator_env, chosen_allocator
from trainer.errors import ConfigError, KoopmanError

__all__ = [
    "EXIT_FATAL",
    "MAX_RESTARTS",
    "Slot",
    "Supervisor",
    "available_gpus",
    "build_supervisor",
    "child_main",
    "parse_gpus",
    "plan_slots",
    "supervise",
]

logger = logging.getLogger(__name__)

EXIT_FATAL = 3  # a slot's exit status for an error that a restart cannot fix; it is not started again
MAX_RESTARTS = 5  # crashes in a row (no trial finished in between) before a slot is given up
RESTART_DELAY, RESTART_DELAY_MAX = 1.0, 60.0  # seconds before a crashed slot starts again; doubles per crash
CHILD_COMMAND = (sys.executable, "-m", "search.workers")
SEED_OFFSET_RANGE = 2**30

_GPU_INDEX = re.compile(r"[0-9]+", re.ASCII)


# ---- slots ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One worker process: the GPU it is pinned to (None on CPU), its environment and its device."""

    index: int
    gpu: int | None
    env: dict[str, str]
    device: str  # "cuda" (the one GPU the process sees) or "cpu"

    @property
    def label(self) -> str:
        return f"slot {self.index} (GPU {self.gpu})" if self.gpu is not None else f"slot {self.index} (CPU)"


def available_gpus() -> int:
    """CUDA GPUs this process can see (0 without torch's CUDA build or a driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(spec: str | None, available: int) -> list[int]:
    """``"0,1,3"`` → ``[0, 1, 3]``; ``"all"`` → every visible GPU; ``None`` → ``[]`` (CPU workers).

    Indices count the GPUs this process sees, as CUDA numbers them (``CUDA_VISIBLE_DEVICES`` and
    ``CUDA_DEVICE_ORDER`` apply; ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` matches ``nvidia-smi``)."""
    if spec is None:
        return []
    text = spec.strip()
    seen = "no CUDA GPU is visible here" if available == 0 else f"{available} GPU(s) visible here"
    if text.lower() == "all":
        if available == 0:
            raise SpecError(
                f"--gpus all needs at least one CUDA GPU, but {seen} (gpus={spec!r}); leave --gpus out and "
                "use --workers N to run on CPU"
            )
        return list(range(available))
    gpus: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not _GPU_INDEX.fullmatch(item):
            raise SpecError(
                f"--gpus must be GPU indices separated by commas, like 0,1,3, or all, but got gpus={spec!r}"
            )
        gpu = int(item)
        if gpu in gpus:
            raise SpecError(f"--gpus must name each GPU once, but got GPU {gpu} twice in gpus={spec!r}")
        if gpu >= available:
            hint = "leave --gpus out to run on CPU" if available == 0 else f"use 0..{available - 1}"
            raise SpecError(f"--gpus must name GPUs that exist, but got GPU {gpu} in gpus={spec!r} and {seen}; "
                            f"{hint}")
        gpus.append(gpu)
    return gpus


def plan_slots(
    gpus: Sequence[int], trials_per_gpu: int = 1, workers: int | None = None, visible_devices: str | None = None
) -> list[Slot]:
    """The worker processes to start: ``trials_per_gpu`` per GPU, GPU by GPU in the order given, each
    pinned with ``CUDA_VISIBLE_DEVICES`` to its one GPU; or, without GPUs, ``workers`` (default 1) CPU
    processes that see no GPU at all.

    ``visible_devices`` is this process's own ``CUDA_VISIBLE_DEVICES``, if any: GPU index i then means its
    i-th entry, which is what the child must be pinned to."""
    if trials_per_gpu < 1:
        raise SpecError(f"--trials-per-gpu must be >= 1, but got trials_per_gpu={trials_per_gpu}")
    if workers is not None and workers < 1:
        raise SpecError(f"--workers must be >= 1, but got workers={workers}")
    if not gpus:
        return [Slot(i, None, {"CUDA_VISIBLE_DEVICES": ""}, "cpu") for i in range(workers or 1)]
    n_slots = len(gpus) * trials_per_gpu
    if workers is not None and workers != n_slots:
        raise SpecError(
            f"--workers must match the GPU slots (GPUs x --trials-per-gpu = {len(gpus)} x {trials_per_gpu} = "
            f"{n_slots}) when --gpus is given, but got workers={workers}; leave --workers out"
        )
    names = [d.strip() for d in visible_devices.split(",")] if visible_devices else None
    slots: list[Slot] = []
    for gpu in gpus:
        if names is not None and gpu >= len(names):
            raise SpecError(f"--gpus must name GPUs listed in CUDA_VISIBLE_DEVICES={visible_devices!r}, "
                            f"but got GPU {gpu}")
        pinned = names[gpu] if names is not None else str(gpu)
        for _ in range(trials_per_gpu):
            slots.append(Slot(len(slots), gpu, {"CUDA_VISIBLE_DEVICES": pinned}, "cuda"))
    return slots


def _shares(n_slots: int, max_trials: int | None) -> list[int | None]:
    """``max_trials`` split as evenly as possible over the slots (earlier slots take the remainder)."""
    if max_trials is None:
        return [None] * n_slots
    return [max_trials // n_slots + (1 if i < max_trials % n_slots else 0) for i in range(n_slots)]


# ---- the supervisor ------------------------------------------------------------------------------------


@dataclass
class _SlotRun:
    slot: Slot
    share: int | None  # trials this slot may start, all its processes together (None: no cap)
    proc: subprocess.Popen[str] | None = None
    readers: list[threading.Thread] = field(default_factory=list)
    status: str = "starting"
    started: int = 0  # trials claimed
    finished: int = 0  # trials that reached an outcome
    crashes: int = 0  # unexpected exits in a row
    restart_at: float | None = None
    signalled: int = 0  # stop requests passed on to the current process
    done: bool = False
    failed: bool = False


class _Board:
    """One status line per slot on stderr. On a terminal the lines stay at the bottom and are redrawn in
    place, with log lines and finished trials printed above them; otherwise each change is one line."""

    def __init__(self, runs: Sequence[_SlotRun], out: TextIO, err: TextIO, live: bool) -> None:
        self._runs = runs
        self._out = out
        self._err = err
        self.live = live
        self._drawn = 0
        self._lock = threading.RLock()

    def _line(self, run: _SlotRun) -> str:
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
        self._drawn = len(self._runs)
        self._err.flush()

    def update(self, run: _SlotRun, status: str) -> None:
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

    def result(self, text: str) -> None:
        """A finished trial's line on stdout."""
        with self._lock:
            if self.live:
                self._clear()
                self._err.flush()
            self._out.write(text + "\n")
            self._out.flush()
            if self.live:
                self._draw()

    def close(self) -> None:
        with self._lock:
            if self.live:  # leave the final state on screen, as plain lines
                self._clear()
                self._draw()
                self._drawn = 0


class _BoardHandler(logging.Handler):
    """The supervisor's own log records, printed through the board so that they do not tear it."""

    def __init__(self, board: _Board, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self._board = board
        if formatter is not None:
            self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._board.log(self.format(record))
        except Exception:  # logging must never raise; the standard handlers do the same
            self.handleError(record)


class Supervisor:
    """Starts one worker process per slot, shows their progress, restarts the ones that crash, and passes
    stop requests on. :meth:`run` returns 0 when every slot ended cleanly (the study's queue is empty, the
    trial cap is reached, or a stop was asked for), 1 when a slot failed for good."""

    def __init__(
        self,
        spec: StudySpec,
        slots: Sequence[Slot],
        storage_url: str | None = None,
        max_trials: int | None = None,
        *,
        out: TextIO | None = None,
        err: TextIO | None = None,
        live: bool | None = None,
        command: Sequence[str] = CHILD_COMMAND,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not slots:
            raise SpecError("a supervisor needs at least one slot, but got slots=[]")
        if max_trials is not None and max_trials < 1:
            raise SpecError(f"--n-trials must be >= 1, but got n_trials={max_trials}")
        self._spec = spec
        self._storage_url = storage_url or spec.storage_url
        self._command = list(command)
        # the slots' memory allocator, KOOPMAN_MALLOC (trainer/alloc.py); a bad value stops here, before any slot
        self._env = allocator_env(chosen_allocator(env if env is not None else os.environ),
                                  os.environ if env is None else env)
        self._clock = clock
        shares = _shares(len(slots), max_trials)
        self._runs = [_SlotRun(slot, share) for slot, share in zip(slots, shares, strict=True) if share != 0]
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        if live is None:
            live = self._err.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
        self._board = _Board(self._runs, self._out, self._err, live)
        self._events: queue.Queue[tuple[_SlotRun, subprocess.Popen[str], str, str]] = queue.Queue()
        self._signals = 0  # stop requests so far (the signal handler only counts)
        self._announced = 0

    @property
    def stop_requested(self) -> bool:
        return self._signals > 0

    def request_stop(self) -> None:
        """Ask every slot to stop: the first time after its current epoch, the second time at once. Safe
        to call from a signal handler (it only counts; the main loop passes the request on)."""
        self._signals += 1

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, handle_signals: bool = True) -> int:
        """Run the slots to the end. With ``handle_signals`` (and on the main thread), SIGTERM and SIGINT
        call :meth:`request_stop` meanwhile."""
        with self._stop_on_signals(handle_signals), self._logs_through_board():
            return self._run()

    @contextmanager
    def _stop_on_signals(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, lambda _signum, _frame: self.request_stop())
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self) -> int:
        try:
            for run in self._runs:
                self._start(run)
            while not all(run.done for run in self._runs):
                self._pump(timeout=0.2)
                self._pass_on_stop()
                for run in self._runs:
                    if run.proc is not None and run.proc.poll() is not None:
                        self._reap(run, run.proc)
                    elif run.proc is None and run.restart_at is not None and (
                            self.stop_requested or self._clock() >= run.restart_at):
                        run.restart_at = None
                        if self.stop_requested:
                            self._finish(run, "stopped")
                        else:
                            self._start(run)
        finally:
            for run in self._runs:  # only reached early by an error here: do not leave slots behind
                if run.proc is not None and run.proc.poll() is None:
                    run.proc.terminate()
                    self._close_stdin(run.proc)
            self._board.close()
        failed = [run.slot.label for run in self._runs if run.failed]
        if failed:
            logger.error("%s stopped for good; see the errors above", ", ".join(failed))
            return 1
        return 0

    @contextmanager
    def _logs_through_board(self) -> Iterator[None]:
        """On a terminal, the supervisor's own log records go through the board (a handler that writes to
        the same stream directly would tear the status lines); elsewhere nothing changes."""
        root = logging.getLogger()
        mine = [h for h in root.handlers
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is self._err]
        if not self._board.live or not mine:
            yield
            return
        board_handler = _BoardHandler(self._board, mine[0].formatter)
        board_handler.setLevel(mine[0].level)
        for h in mine:
            root.removeHandler(h)
        root.addHandler(board_handler)
        try:
            yield
        finally:
            root.removeHandler(board_handler)
            for h in mine:
                root.addHandler(h)

    def _start(self, run: _SlotRun) -> None:
        slot = run.slot
        remaining = None if run.share is None else run.share - run.started
        job = {
            "spec": self._spec.to_dict(),
            "path": str(self._spec.path) if self._spec.path else None,
            "storage_url": self._storage_url,
            "slot": slot.index,
            "device": slot.device,
            "max_trials": remaining,
            # the sampler's seed is the study's plus this offset: fresh per process, so that processes on
            # several machines, or a slot started again, do not propose the same parameters
            "seed_offset": secrets.randbelow(SEED_OFFSET_RANGE),
            "log_level": logging.getLevelName(logging.getLogger("search").getEffectiveLevel()),
        }
        env = {**self._env, **slot.env, "PYTHONUNBUFFERED": "1"}
        if slot.gpu is None and "OMP_NUM_THREADS" not in env:
            # CPU slots share the cores; torch's default of one thread per core in each would oversubscribe
            cpu_slots = sum(1 for r in self._runs if r.slot.gpu is None)
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_slots))
        proc = subprocess.Popen(
            self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            text=True, encoding="utf-8", errors="replace", bufsize=1, start_new_session=True,
        )
        run.proc, run.signalled = proc, 0
        stdin, stdout, stderr = (cast(IO[str], pipe) for pipe in (proc.stdin, proc.stdout, proc.stderr))
        try:
            stdin.write(json.dumps(job) + "\n")
            stdin.flush()
        except OSError:  # it died at once; _reap says so
            pass
        run.readers = [
            threading.Thread(target=self._read, args=(run, proc, stdout, "event"), daemon=True,
                             name=f"slot-{slot.index}-events"),
            threading.Thread(target=self._read, args=(run, proc, stderr, "log"), daemon=True,
                             name=f"slot-{slot.index}-log"),
        ]
        for reader in run.readers:
            reader.start()
        self._board.update(run, f"starting (pid {proc.pid})")

    def _read(self, run: _SlotRun, proc: subprocess.Popen[str], stream: IO[str], kind: str) -> None:
        for line in stream:
            self._events.put((run, proc, kind, line.rstrip("\n")))

    def _pump(self, timeout: float) -> None:
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, run: _SlotRun, proc: subprocess.Popen[str], kind: str, line: str) -> None:
        if kind == "log":
            self._board.log(f"[slot {run.slot.index}] {line}")
            return
        try:
            event = json.loads(line)
            name = event["event"]
        except (ValueError, TypeError, KeyError):
            self._board.log(f"[slot {run.slot.index}] {line}")  # not an event: something printed on stdout
            return
        if name == "ready":
            self._board.update(run, f"baseline, or waiting for it, then trials (pid {proc.pid})")
        elif name == "trial":
            run.started += 1
            self._board.update(run, f"trial {event['number']} starting (pid {proc.pid})")
        elif name == "epoch":
            self._board.update(run, f"trial {event['number']} epoch {event['epoch']}/{event['epochs']} "
                                    f"val PPL {_fmt(event.get('val_ppl'))} (pid {proc.pid})")
        elif name == "baseline_epoch":
            self._board.update(run, f"baseline epoch {event['epoch']}/{event['epochs']} (pid {proc.pid})")
        elif name == "outcome":
            run.finished += 1
            run.crashes = 0
            self._board.result(event["line"])
            reason = f": {event['reason']}" if event.get("reason") else ""
            self._board.update(run, f"trial {event['number']} {event['state']}{reason} (pid {proc.pid})")
        elif name == "exit":
            self._board.update(run, f"{event['reason']} (pid {proc.pid})")

    def _pass_on_stop(self) -> None:
        if self._signals > self._announced:
            self._announced = self._signals
            if self._signals == 1:
                logger.warning("stopping: each slot finishes its epoch, checkpoints and hands its trial back "
                               "(again to stop at once)")
            else:
                logger.warning("stopping at once: each trial is handed back from its previous checkpoint")
        for run in self._runs:
            if run.proc is None or run.proc.poll() is not None:
                continue
            while run.signalled < self._signals:
                run.signalled += 1
                try:
                    run.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:  # it just exited; _reap sees it
                    break
                if run.signalled == 1:
                    self._board.update(run, "stopping after this epoch")

    def _reap(self, run: _SlotRun, proc: subprocess.Popen[str]) -> None:
        code = proc.returncode
        for reader in run.readers:
            reader.join(timeout=5)  # the last events come before end of file
        self._pump(timeout=0)
        self._close_stdin(proc)
        run.proc, run.readers = None, []
        if code == 0:
            self._finish(run, "stopped" if self.stop_requested else f"finished ({run.finished} trial(s))")
            return
        how = _describe_exit(code)
        if self.stop_requested:
            self._finish(run, f"stopped ({how})")
            return
        if code == EXIT_FATAL:
            run.failed = True
            self._finish(run, f"failed ({how}); not started again")
            return
        if run.share is not None and run.started >= run.share:
            self._finish(run, f"{how} after its last trial")
            return
        if run.crashes >= MAX_RESTARTS:
            run.failed = True
            self._finish(run, f"{how}; gave up after {run.crashes + 1} crashes in a row")
            return
        delay = min(RESTART_DELAY * 2**run.crashes, RESTART_DELAY_MAX)
        run.crashes += 1
        run.restart_at = self._clock() + delay
        logger.warning("%s %s; starting it again in %.0f s", run.slot.label, how, delay)
        self._board.update(run, f"{how}; starting again in {delay:.0f} s")

    def _finish(self, run: _SlotRun, status: str) -> None:
        run.done = True
        self._board.update(run, status)

    @staticmethod
    def _close_stdin(proc: subprocess.Popen[str]) -> None:
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def build_supervisor(
    spec: StudySpec,
    gpus: str | Sequence[int] | None = None,
    trials_per_gpu: int = 1,
    workers: int | None = None,
    storage_url: str | None = None,
    max_trials: int | None = None,
) -> Supervisor:
    """The supervisor for ``--gpus``/``--trials-per-gpu``/``--workers`` on this machine (checked here)."""
    if isinstance(gpus, str):
        gpu_list = parse_gpus(gpus, available_gpus())
    else:
        gpu_list = list(gpus or [])
    if gpus is None and workers is None:
        visible = available_gpus()
        if visible:
            logger.warning("no --gpus given: running 1 worker on CPU although %d GPU(s) are visible; "
                           "add --gpus all to use them", visible)
    slots = plan_slots(gpu_list, trials_per_gpu, workers, os.environ.get("CUDA_VISIBLE_DEVICES"))
    logger.info("%d worker process(es): %s", len(slots), ", ".join(
        f"{s.label} CUDA_VISIBLE_DEVICES={s.env['CUDA_VISIBLE_DEVICES']!r}" for s in slots))
    return Supervisor(spec, slots, storage_url, max_trials)


def supervise(
    spec: StudySpec,
    gpus: str | Sequence[int] | None = None,
    trials_per_gpu: int = 1,
    workers: int | None = None,
    storage_url: str | None = None,
    max_trials: int | None = None,
) -> int:
    """Run the study's trials in one process per slot until its queue is empty (or ``max_trials`` ran
    here, or SIGTERM/SIGINT). ``gpus``: ``"0,1,3"``, ``"all"``, a list of indices, or None for CPU
    workers. Returns 0 when every slot ended cleanly, 1 when one failed for good."""
    return build_supervisor(spec, gpus, trials_per_gpu, workers, storage_url, max_trials).run()


# ---- a worker process ------------------------------------------------------------------------------


class _Events:
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
                self._stream.write(json.dumps({"event": event, **fields}) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # the supervisor is gone; end of file on stdin stops us too
                self._gone = True


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
    """One worker process (``python -m search.workers``), started by :class:`Supervisor`: reads its job
    from stdin, runs :func:`search.runner.run_worker`, reports on stdout. Exit 0 when done or stopped,
    :data:`EXIT_FATAL` for an error a restart cannot fix, 1 for any other error."""
    line = sys.stdin.readline()
    if not line.strip():
        print("search.workers: expects a job on stdin; start workers with `koopman-search worker`",
              file=sys.stderr)
        return EXIT_FATAL
    job = json.loads(line)
    from optuna.exceptions import ExperimentalWarning

    # the storage uses Optuna's heartbeat options, which Optuna marks experimental; say it once, not per slot
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    events = _Events(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)  # stray prints (or C libraries) go to stderr, never into the event stream
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("trainer", "search"):
        logging.getLogger(name).setLevel(job.get("log_level") or "INFO")

    stop = threading.Event()
    _stop_on_signals(stop)
    threading.Thread(target=_watch_supervisor, args=(sys.stdin, stop), daemon=True,
                     name="supervisor-watch").start()
    events.emit("ready", pid=os.getpid(), device=job["device"])

    from search.runner import TrialOutcome, format_outcome, run_worker

    try:
        spec = spec_from_dict(job["spec"], origin=job.get("path") or "study")
        spec = dataclasses.replace(spec, path=Path(job["path"]) if job.get("path") else None,
                                   storage_url=job["storage_url"])

        def on_outcome(o: TrialOutcome) -> None:
            events.emit("outcome", number=o.number, state=o.state, reason=o.reason,
                        line=format_outcome(o, spec.metrics))

        summary = run_worker(
            spec, job["storage_url"], worker_index=int(job.get("seed_offset", 0)), device=job["device"],
            max_trials=job.get("max_trials"), stop=stop, on_outcome=on_outcome,
            on_trial_start=lambda number: events.emit("trial", number=number),
            on_epoch=lambda number, r: events.emit("epoch", number=number, epoch=r.epoch, epochs=r.epochs,
                                                   val_ppl=_finite(r.val_ppl)),
            on_baseline_epoch=lambda r: events.emit("baseline_epoch", epoch=r.epoch, epochs=r.epochs),
        )
    except KeyboardInterrupt:
        events.emit("exit", reason="stopped at once")
        return 0
    except KoopmanError as exc:
        if stop.is_set():  # e.g. stopped while the baseline ran or was waited for
            events.emit("exit", reason="stopped")
            return 0
        logger.error("%s", exc)
        fatal = isinstance(exc, (ConfigError, BaselineError, StudyNotFoundError))
        return EXIT_FATAL if fatal else 1
    n = len(summary.outcomes)
    if summary.interrupted:
        reason = "stopped"
    elif job.get("max_trials") is not None and n >= job["max_trials"]:
        reason = f"ran its {n} trial(s) (--n-trials)"
    else:
        reason = f"queue empty, {n} trial(s) run"
    events.emit("exit", reason=reason)
    return 0


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    sys.exit(child_main())
