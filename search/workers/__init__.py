"""Worker processes on one machine: one per GPU slot (or N on CPU), under one supervisor.

``koopman-search worker STUDY.toml --gpus 0,1 --trials-per-gpu 2`` starts this tree::

    supervisor (this process)                  status lines on stderr, finished trials on stdout
    ├── slot 0  python -m koopman_search.search.workers       CUDA_VISIBLE_DEVICES=0  device cuda
    ├── slot 1  python -m koopman_search.search.workers       CUDA_VISIBLE_DEVICES=0  device cuda
    ├── slot 2  python -m koopman_search.search.workers       CUDA_VISIBLE_DEVICES=1  device cuda
    └── slot 3  python -m koopman_search.search.workers       CUDA_VISIBLE_DEVICES=1  device cuda

Each slot runs :func:`search.workers.loop.run_worker` in a fresh process (``subprocess``, not ``fork``, so CUDA
starts clean), pulling trials from the shared study until its queue is empty. The budget is the study's:
the same command on another machine with the same storage URL joins the same study.

How the supervisor and a slot talk:

* the supervisor writes one JSON line to the slot's stdin, the job (study, storage URL, device, trial
  cap), and keeps stdin open: end of file tells the slot that its supervisor is gone, and it stops as on
  SIGTERM;
* the slot writes JSON events to its stdout, one per line (``trial``, ``epoch``, ``outcome``, ...: see
  :mod:`koopman_search.search.workers.events`), and its logs to stderr; the supervisor reads both pipes with a thread
  each, keeps one status line per slot and prints each finished trial's line on stdout.

Signals: the first SIGTERM or SIGINT asks every slot to stop after its current epoch; the slot
checkpoints, hands its trial back to the queue (it resumes from that checkpoint on the next run) and exits
0, and so does the supervisor. A second signal stops the slots at once, each trial handed back from its
previous checkpoint. Slots run in their own session, so Ctrl-C in a terminal reaches the supervisor only.

A slot that dies unexpectedly (killed, out of memory, a crash) is started again after a pause that doubles
with each crash in a row (1 s, 2 s, 4 s, ... up to a minute), at most :data:`MAX_RESTARTS` times in a row;
its trial is failed by heartbeat and retried by whichever worker asks next. A slot that stops on an error
a restart cannot fix (a bad study file, a failed baseline, a missing study) is not started again.

The package, a module per job: :mod:`~koopman_search.search.workers.slots` (which processes, on which GPU),
:mod:`~search.workers.board` (the status lines), :mod:`~search.workers.supervisor` (the parent),
:mod:`~search.workers.events` (the protocol), :mod:`~search.workers.child` (a worker process) and
:mod:`~koopman_search.search.workers.loop` (what a worker does: :func:`run_worker`).
"""

from __future__ import annotations

from koopman_search.search.workers.events import EXIT_FATAL
from koopman_search.search.workers.loop import WorkerSummary, run_worker
from koopman_search.search.workers.restart import MAX_RESTARTS, RestartDecision, decide_restart
from koopman_search.search.workers.slots import Slot, available_gpus, parse_gpus, plan_slots
from koopman_search.search.workers.supervisor import Supervisor, build_supervisor

__all__ = [
    "EXIT_FATAL",
    "MAX_RESTARTS",
    "RestartDecision",
    "Slot",
    "Supervisor",
    "WorkerSummary",
    "available_gpus",
    "build_supervisor",
    "decide_restart",
    "parse_gpus",
    "plan_slots",
    "run_worker",
]
