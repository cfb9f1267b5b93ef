"""The memory allocator of training processes: glibc's as it comes, glibc's with tunables, or jemalloc.

A training step allocates and frees tensors of several MB (activations, gradients, the LM head's chunk buffer).
glibc serves allocations above its mmap threshold with fresh ``mmap`` pages and hands them back on free, so
every step pays page faults to get them again; a higher threshold and trim threshold keep that memory in the
heap instead, and jemalloc keeps freed pages for reuse on its own. What each costs and saves is measured by
``bench/bench_trainer.py --only memory`` (BENCHMARKS.md, docs/speed.md).

An allocator is chosen when a process starts, so it is set in the environment of the processes a command
starts (the worker slots, see search/workers.py): ``KOOPMAN_MALLOC`` = ``glibc`` | ``glibc-tuned`` |
``jemalloc``, default :data:`DEFAULT` (glibc as it comes). jemalloc needs Debian's ``libjemalloc2``; where it
is missing the slots fall back to ``glibc-tuned`` with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from koopman_search.trainer.errors import ConfigError

__all__ = ["ALLOCATORS", "DEFAULT", "ENV_VAR", "GLIBC_TUNED", "allocator_env", "chosen_allocator", "jemalloc_path"]

logger = logging.getLogger(__name__)

ALLOCATORS = ("glibc", "glibc-tuned", "jemalloc")
ENV_VAR = "KOOPMAN_MALLOC"
# glibc as it comes: with the fused LM head a trainer step page-faults next to nothing under glibc, and jemalloc
# faulted more (BENCHMARKS.md, "Memory"); the other two stay selectable.
DEFAULT = "glibc"
# mmap threshold at glibc's maximum on 64-bit (32 MiB): allocations up to it come from the heap; trim threshold
# 512 MiB and top pad 64 MiB: freed memory stays in the heap for the next step instead of going back to the kernel.
GLIBC_TUNED = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=536870912:glibc.malloc.top_pad=67108864"
_JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
)


def jemalloc_path() -> str | None:
    """Where Debian's (or another distribution's) libjemalloc.so.2 is, or None."""
    return next((p for p in _JEMALLOC_PATHS if Path(p).is_file()), None)


def chosen_allocator(env: Mapping[str, str] | None = None) -> str:
    """The allocator ``KOOPMAN_MALLOC`` asks for (default :data:`DEFAULT`); a ConfigError for another value."""
    name = (os.environ if env is None else env).get(ENV_VAR, "") or DEFAULT
    if name not in ALLOCATORS:
        raise ConfigError(f"{ENV_VAR} must be one of {', '.join(ALLOCATORS)}, but got {ENV_VAR}={name!r}")
    return name


def _without(value: str, part: str, sep: str) -> str:
    return sep.join(p for p in value.split(sep) if p and p != part)


def allocator_env(name: str, env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` for a process that should use allocator ``name`` (this module's settings replaced)."""
    if name not in ALLOCATORS:
        raise ConfigError(f"{ENV_VAR} must be one of {', '.join(ALLOCATORS)}, but got {ENV_VAR}={name!r}")
    out = dict(env)
    jemalloc = jemalloc_path()
    preload = _without(out.get("LD_PRELOAD", ""), jemalloc or "", ":")
    tunables = _without(out.get("GLIBC_TUNABLES", ""), GLIBC_TUNED, ":")
    for tunable in GLIBC_TUNED.split(":"):
        tunables = _without(tunables, tunable, ":")
    if name == "jemalloc" and jemalloc is None:
        logger.warning(
            "%s=jemalloc but libjemalloc.so.2 is not installed (apt-get install libjemalloc2); using glibc-tuned",
            ENV_VAR,
        )
        name = "glibc-tuned"
    if name == "jemalloc" and jemalloc is not None:
        preload = ":".join(p for p in (jemalloc, preload) if p)
    if name == "glibc-tuned":
        tunables = ":".join(p for p in (tunables, GLIBC_TUNED) if p)
    for key, value in (("LD_PRELOAD", preload), ("GLIBC_TUNABLES", tunables)):
        if value:
            out[key] = value
        else:
            out.pop(key, None)
    out[ENV_VAR] = name
    return out
