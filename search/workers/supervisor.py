"""The supervisor: starts one worker process per slot, shows their progress, restarts the ones that crash,
and passes stop requests on (the process tree and its protocol: :mod:`koopman_search.search.workers`)."""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any, TextIO, cast

from koopman_search.search.errors import SpecError
from koopman_search.search.settings import LOGGER
from koopman_search.search.studyfile.spec import StudySpec
from koopman_search.search.workers import events
from koopman_search.search.workers.board import Board, BoardHandler, SlotRun
from koopman_search.search.workers.restart import decide_restart
from koopman_search.search.workers.slots import (
    Slot,
    available_gpus,
    omp_threads,
    parse_gpus,
    plan_slots,
    split_trials,
)
from koopman_search.trainer.alloc import allocator_env, chosen_allocator
from koopman_search.trainer.errors import KoopmanError

__all__ = ["CHILD_COMMAND", "Supervisor", "build_supervisor"]

logger = logging.getLogger(__name__)

CHILD_COMMAND = (sys.executable, "-m", "koopman_search.search.workers")
SEED_OFFSET_RANGE = 2**30


class Supervisor:
    """Starts one worker process per slot, shows their progress, restarts the ones that crash, and passes
    stop requests on. :meth:`run` returns 0 when every slot ended cleanly (the study's queue is empty, the
    trial cap is reached, or a stop was asked for), 1 when a slot failed for good or a trial was lost to
    environment faults (docs/design.md, "Fault model")."""

    def __init__(
        self,
        spec: StudySpec,
        slots: Sequence[Slot],
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
            raise SpecError(f"--max-trials must be >= 1, but got max_trials={max_trials}")
        self._spec = spec
        self._command = list(command)
        # the slots' memory allocator, KOOPMAN_MALLOC (trainer/alloc.py); a bad value stops here, before any slot
        self._env = allocator_env(
            chosen_allocator(env if env is not None else os.environ), os.environ if env is None else env
        )
        self._clock = clock
        shares = split_trials(len(slots), max_trials)
        self._runs = [SlotRun(slot, share) for slot, share in zip(slots, shares, strict=True) if share != 0]
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        if live is None:
            live = self._err.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
        self._board = Board(self._runs, self._out, self._err, live)
        self._events: queue.Queue[tuple[SlotRun, subprocess.Popen[str], str, str]] = queue.Queue()
        self._signals = 0  # stop requests so far (the signal handler only counts)
        self._storage: Any = None  # opened when a process dies in a trial
        self._lost: list[int] = []  # trials their environment failed too often to queue them again
        self._announced = 0

    def expect_trials(self, n: int) -> None:
        """The trials this run expects (the study's queue): the board's n/N line and ETA count to it."""
        self._board.trials.total = n

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
                    elif (
                        run.proc is None
                        and run.restart_at is not None
                        and (self.stop_requested or self._clock() >= run.restart_at)
                    ):
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
        if self._lost:
            logger.error(
                "%d trial(s) lost to environment faults (trial %s); see the errors above",
                len(self._lost),
                ", ".join(map(str, sorted(self._lost))),
            )
            return 1
        return 0

    @contextmanager
    def _logs_through_board(self) -> Iterator[None]:
        """On a terminal, the supervisor's own log records go through the board (a handler that writes to
        the same stream directly would tear the status lines); elsewhere nothing changes."""
        root = logging.getLogger()
        mine = [
            h for h in root.handlers if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is self._err
        ]
        if not self._board.live or not mine:
            yield
            return
        board_handler = BoardHandler(self._board, mine[0].formatter)
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

    def _start(self, run: SlotRun) -> None:
        slot = run.slot
        remaining = None if run.share is None else run.share - run.started
        job = {
            "spec": self._spec.to_dict(),
            "path": str(self._spec.path) if self._spec.path else None,
            "storage_url": self._spec.storage_url,
            "slot": slot.index,
            "device": slot.device,
            "threads": slot.threads,
            "max_trials": remaining,
            # the sampler's seed is the study's plus this offset: fresh per process, so that processes on
            # several machines, or a slot started again, do not propose the same parameters
            "seed_offset": secrets.randbelow(SEED_OFFSET_RANGE),
            "log_level": logging.getLevelName(logging.getLogger(LOGGER).getEffectiveLevel()),
        }
        env = {**self._env, **slot.env, "PYTHONUNBUFFERED": "1"}  # the slot's threads (search/workers/slots.py)
        proc = subprocess.Popen(
            self._command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        run.proc, run.signalled = proc, 0
        stdin, stdout, stderr = (cast(IO[str], pipe) for pipe in (proc.stdin, proc.stdout, proc.stderr))
        try:
            stdin.write(json.dumps(job) + "\n")
            stdin.flush()
        except OSError:  # it died at once; _reap says so
            pass
        run.readers = [
            threading.Thread(
                target=self._read, args=(run, proc, stdout, "event"), daemon=True, name=f"slot-{slot.index}-events"
            ),
            threading.Thread(
                target=self._read, args=(run, proc, stderr, "log"), daemon=True, name=f"slot-{slot.index}-log"
            ),
        ]
        for reader in run.readers:
            reader.start()
        self._board.update(run, f"starting (pid {proc.pid})")

    def _read(self, run: SlotRun, proc: subprocess.Popen[str], stream: IO[str], kind: str) -> None:
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

    def _handle(self, run: SlotRun, proc: subprocess.Popen[str], kind: str, line: str) -> None:
        if kind == "log":
            self._board.log(f"[slot {run.slot.index}] {line}")
            return
        try:
            event = json.loads(line)
            name = event[events.EVENT_KEY]
        except (ValueError, TypeError, KeyError):
            self._board.log(f"[slot {run.slot.index}] {line}")  # not an event: something printed on stdout
            return
        if name == events.READY:
            self._board.update(run, f"baseline, or waiting for it, then trials (pid {proc.pid})")
        elif name == events.TRIAL:
            run.started += 1
            self._board.trials.started(event["number"])
            run.current = int(event["number"])
            self._board.update(run, f"trial {event['number']} starting (pid {proc.pid})")
        elif name == events.EPOCH:
            self._board.update(run, f"trial {event['number']} {self._board.epoch_status(event)} (pid {proc.pid})")
        elif name == events.BASELINE_EPOCH:
            self._board.update(run, f"baseline {self._board.epoch_status(event)} (pid {proc.pid})")
        elif name == events.STEP and self._board.live:  # in a log, the epochs' lines are enough
            who = "baseline" if event.get("number") is None else f"trial {event['number']}"
            self._board.update(run, f"{who} {self._board.step_status(event)} (pid {proc.pid})")
        elif name == events.OUTCOME:
            run.crashes = run.outages = 0
            run.current = None
            if event.get("requeued"):
                run.started -= 1  # failed by its environment and queued again: it does not use up a trial
            else:
                run.finished += 1
            if event.get("lost"):
                self._lost.append(int(event["number"]))
            self._board.result(event["line"], number=event["number"])
            reason = f": {event['reason']}" if event.get("reason") else ""
            self._board.update(run, f"trial {event['number']} {event['state']}{reason} (pid {proc.pid})")
        elif name == events.EXIT:
            self._board.update(run, f"{event['reason']} (pid {proc.pid})")

    def _pass_on_stop(self) -> None:
        if self._signals > self._announced:
            self._announced = self._signals
            if self._signals == 1:
                logger.warning(
                    "stopping: each slot finishes its epoch, checkpoints and hands its trial back "
                    "(again to stop at once)"
                )
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

    def _reap(self, run: SlotRun, proc: subprocess.Popen[str]) -> None:
        code = proc.returncode
        for reader in run.readers:
            reader.join(timeout=5)  # the last events come before end of file
        self._pump(timeout=0)
        self._close_stdin(proc)
        run.proc, run.readers = None, []
        if run.current is not None:  # it died in the middle of a trial
            if self._requeue(run.current, _describe_exit(code)):
                run.started -= 1  # the killed attempt does not count toward --max-trials
            run.current = None
        how = _describe_exit(code)
        share_used = run.share is not None and run.started >= run.share
        decision = decide_restart(code, self.stop_requested, share_used, run.crashes, run.outages)
        if decision.action == "restart":
            run.restart_at = self._clock() + decision.delay
            if decision.reason == "outage":
                run.outages += 1
                logger.warning(
                    "%s: the database is unreachable; starting it again in %.0f s", run.slot.label, decision.delay
                )
                self._board.update(run, f"database unreachable; starting again in {decision.delay:.0f} s")
            else:
                run.crashes += 1
                logger.warning("%s %s; starting it again in %.0f s", run.slot.label, how, decision.delay)
                self._board.update(run, f"{how}; starting again in {decision.delay:.0f} s")
            return
        run.failed = decision.action == "give up"
        self._finish(
            run,
            {
                "finished": f"finished ({run.finished} trial(s))",
                "stopped": "stopped" if code == 0 else f"stopped ({how})",
                "fatal": f"failed ({how}); not started again",
                "share used": f"{how} after its last trial",
                "too many crashes": f"{how}; gave up after {run.crashes + 1} crashes in a row",
            }[decision.reason],
        )

    def _requeue(self, number: int, how: str) -> bool:
        """Fail the trial of a process that died and queue it again at once (no wait for its heartbeat to go
        stale); its retry resumes from its checkpoint. False when it was no longer RUNNING, or the
        database could not be reached (the heartbeat then does it later)."""
        import optuna

        from koopman_search.search.engine.study import requeue_dead_trial
        from koopman_search.search.storage.database import open_storage

        reason = f"its worker process {how}; queued to resume from its last checkpoint"
        try:
            if self._storage is None:
                self._storage = open_storage(self._spec.storage_url, heartbeat=False)
            if not requeue_dead_trial(self._storage, self._spec.name, number, reason):
                return False
        except (optuna.exceptions.OptunaError, KoopmanError, ValueError) as exc:
            logger.warning("trial %d of a dead process not queued again here (%s); its heartbeat will be", number, exc)
            return False
        logger.warning("trial %d: %s", number, reason)
        return True

    def _finish(self, run: SlotRun, status: str) -> None:
        run.done = True
        self._board.update(run, status)

    @staticmethod
    def _close_stdin(proc: subprocess.Popen[str]) -> None:
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass


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
    max_trials: int | None = None,
    threads: int | None = None,
) -> Supervisor:
    """The supervisor for ``--gpus``/``--trials-per-gpu``/``--workers``/``--threads`` on this machine (checked
    here). Without ``threads``, a valid ``OMP_NUM_THREADS`` in the environment is each slot's; else the cores
    are shared out (:func:`~koopman_search.search.workers.slots.threads_per_slot`)."""
    if isinstance(gpus, str):
        gpu_list = parse_gpus(gpus, available_gpus())
    else:
        gpu_list = list(gpus or [])
    if gpus is None and workers is None:
        visible = available_gpus()
        if visible:
            logger.warning(
                "no --gpus given: running 1 worker on CPU although %d GPU(s) are visible; add --gpus all to use them",
                visible,
            )
    slots = plan_slots(
        gpu_list, trials_per_gpu, workers, os.environ.get("CUDA_VISIBLE_DEVICES"), threads=threads or omp_threads()
    )
    logger.info(
        "%d worker process(es): %s",
        len(slots),
        ", ".join(
            f"{s.label} CUDA_VISIBLE_DEVICES={s.env['CUDA_VISIBLE_DEVICES']!r} {s.threads} torch thread(s)"
            for s in slots
        ),
    )
    return Supervisor(spec, slots, max_trials)
