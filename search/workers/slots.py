"""GPU slots: which worker processes to start on this machine, each pinned to its GPU (or on CPU), and the
torch threads each may use.

Every slot, CPU or GPU, gets ``threads`` torch threads (intra- and inter-op; ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` in its environment too): ``--threads`` when given, else the cores this process may use
divided evenly among the slots, at least one (:func:`threads_per_slot`). A GPU slot needs its CPU threads
too (batching, validation metrics, checkpoints); without a setting each would start one per core.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from koopman_search.search.errors import SpecError
from koopman_search.trainer.threads import THREADS_ENV, usable_cores

__all__ = ["Slot", "available_gpus", "omp_threads", "parse_gpus", "plan_slots", "split_trials", "threads_per_slot"]

_GPU_INDEX = re.compile(r"[0-9]+", re.ASCII)


@dataclass(frozen=True)
class Slot:
    """One worker process: the GPU it is pinned to (None on CPU), its environment and its device."""

    index: int
    gpu: int | None
    env: dict[str, str]
    device: str  # "cuda" (the one GPU the process sees) or "cpu"
    threads: int = 1  # torch threads of its process

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
            raise SpecError(f"--gpus must name GPUs that exist, but got GPU {gpu} in gpus={spec!r} and {seen}; {hint}")
        gpus.append(gpu)
    return gpus


def threads_per_slot(n_slots: int, cores: int | None = None, threads: int | None = None) -> int:
    """torch threads for each of ``n_slots`` worker processes on a machine: ``threads`` (``--threads``) when
    given, else ``cores`` (default: those this process may use) divided evenly, at least 1."""
    if threads is not None:
        if threads < 1:
            raise SpecError(f"--threads must be >= 1, but got threads={threads}")
        return threads
    return max(1, (cores if cores is not None else usable_cores()) // max(1, n_slots))


def plan_slots(
    gpus: Sequence[int],
    trials_per_gpu: int = 1,
    workers: int | None = None,
    visible_devices: str | None = None,
    *,
    threads: int | None = None,
    cores: int | None = None,
) -> list[Slot]:
    """The worker processes to start: ``trials_per_gpu`` per GPU, GPU by GPU in the order given, each
    pinned with ``CUDA_VISIBLE_DEVICES`` to its one GPU; or, without GPUs, ``workers`` (default 1) CPU
    processes that see no GPU at all.

    ``visible_devices`` is this process's own ``CUDA_VISIBLE_DEVICES``, if any: GPU index i then means its
    i-th entry, which is what the child must be pinned to. Each slot's torch threads: :func:`threads_per_slot`
    of ``threads`` (``--threads``) and ``cores``."""
    if trials_per_gpu < 1:
        raise SpecError(f"--trials-per-gpu must be >= 1, but got trials_per_gpu={trials_per_gpu}")
    if workers is not None and workers < 1:
        raise SpecError(f"--workers must be >= 1, but got workers={workers}")
    n_slots = len(gpus) * trials_per_gpu if gpus else workers or 1
    per_slot = threads_per_slot(n_slots, cores, threads)
    pinned_threads = dict.fromkeys(THREADS_ENV, str(per_slot))
    if not gpus:
        return [Slot(i, None, {"CUDA_VISIBLE_DEVICES": "", **pinned_threads}, "cpu", per_slot) for i in range(n_slots)]
    if workers is not None and workers != n_slots:
        raise SpecError(
            f"--workers must match the GPU slots (GPUs x --trials-per-gpu = {len(gpus)} x {trials_per_gpu} = "
            f"{n_slots}) when --gpus is given, but got workers={workers}; leave --workers out"
        )
    names = [d.strip() for d in visible_devices.split(",")] if visible_devices else None
    slots: list[Slot] = []
    for gpu in gpus:
        if names is not None and gpu >= len(names):
            raise SpecError(
                f"--gpus must name GPUs listed in CUDA_VISIBLE_DEVICES={visible_devices!r}, but got GPU {gpu}"
            )
        pinned = names[gpu] if names is not None else str(gpu)
        for _ in range(trials_per_gpu):
            slots.append(Slot(len(slots), gpu, {"CUDA_VISIBLE_DEVICES": pinned, **pinned_threads}, "cuda", per_slot))
    return slots


def omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` of this process's environment when it is a count >= 1 (a user's own setting), else
    None."""
    raw = os.environ.get("OMP_NUM_THREADS", "")
    return int(raw) if raw.isdigit() and int(raw) >= 1 else None


def split_trials(n_slots: int, max_trials: int | None) -> list[int | None]:
    """``max_trials`` split as evenly as possible over the slots (earlier slots take the remainder)."""
    if max_trials is None:
        return [None] * n_slots
    return [max_trials // n_slots + (1 if i < max_trials % n_slots else 0) for i in range(n_slots)]
