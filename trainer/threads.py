"""How many CPU threads torch uses in this process.

A worker process is one slot among several on a machine; each sets its threads from the cores it may use and
the number of slots (search/workers/slots.py, ``threads_per_slot``), or from ``--threads``. torch's default,
one intra-op thread per core in every process, oversubscribes a machine shared by slots or other jobs
(BENCHMARKS.md, "Threads per slot").
"""

from __future__ import annotations

import logging
import os

__all__ = ["THREADS_ENV", "set_torch_threads", "usable_cores"]

logger = logging.getLogger(__name__)

THREADS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what each slot's process environment carries


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share), else
    every CPU of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_torch_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (and as many inter-op threads, where torch still allows that: only
    before the process's first parallel work). Returns the intra-op count torch now reports."""
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, but got threads={threads}")
    if torch.get_num_threads() != threads:  # a worker process's OMP_NUM_THREADS has set it already
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # set already, or parallel work has started: the inter-op pool keeps its size
        logger.debug("torch's inter-op threads stay at %d", torch.get_num_interop_threads())
    return int(torch.get_num_threads())
