"""Options and lookups shared by the study commands.

Where the storage comes from, first found wins: ``--storage URL``, then ``$OPTUNA_STORAGE`` (optuna's own
habit; docker-compose sets it), then the first line of the file ``$KOOPMAN_STORAGE_FILE`` names (a secret
file), then the study file's ``storage`` (a SQLite file next to it by default). A URL with a password
belongs in the environment or that file: on the command line every user of the machine sees it (``ps``).
The artifact store likewise: ``--artifacts DIR``, ``$KOOPMAN_ARTIFACTS``, the study file's ``artifacts``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koopman_search.search.errors import SpecError
from koopman_search.search.studyfile.spec import StudySpec, load_spec
from koopman_search.trainer.errors import ConfigError

__all__ = [
    "StudyTarget",
    "add_storage_args",
    "add_study_args",
    "add_worker_args",
    "check_counts",
    "refuse_proxy",
    "render_table",
    "resolve_target",
    "spec_with_overrides",
    "use_threads",
    "waiting_trials",
]

STORAGE_ENV = "OPTUNA_STORAGE"
STORAGE_FILE_ENV = "KOOPMAN_STORAGE_FILE"
ARTIFACTS_ENV = "KOOPMAN_ARTIFACTS"


def add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        metavar="URL",
        help=f"storage URL, e.g. postgresql+psycopg://user@host/db (default: ${STORAGE_ENV}, else the "
        f"file named by ${STORAGE_FILE_ENV}, else the study file's); give a URL with a password "
        f"through ${STORAGE_ENV} or ${STORAGE_FILE_ENV}, never here: arguments are visible to "
        "every user of the machine",
    )
    p.add_argument(
        "--artifacts",
        metavar="DIR",
        help=f"artifact store for checkpoints: a shared directory or s3://bucket "
        f"(default: ${ARTIFACTS_ENV}, else the study file's)",
    )


def add_study_args(p: argparse.ArgumentParser, file_required: bool = True) -> None:
    if file_required:
        p.add_argument("study", metavar="STUDY.toml", help="the study file")
    else:
        p.add_argument("study", nargs="?", metavar="STUDY.toml", help="the study file")
        p.add_argument("--study-name", metavar="NAME", help="the study's name (instead of a study file)")
    add_storage_args(p)


def add_budget_arg(p: argparse.ArgumentParser) -> None:
    """``--n-trials`` of create and launch: the study's budget (worker's caps its own trials instead)."""
    p.add_argument(
        "--n-trials",
        type=int,
        metavar="N",
        help="raise the study's trial budget to N trials in all, over every worker (default: the "
        "file's n_trials; a budget is never lowered)",
    )


def add_redefine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redefine",
        action="store_true",
        help="continue a study whose file changed (search space, objectives, trainer config) under the file's "
        "new definition, instead of refusing; the trials so far stay as they ran",
    )


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """The options that say which worker processes run here: ``--gpus``, ``--trials-per-gpu``, ``--workers``
    (``launch`` and ``worker`` share them; :func:`koopman_search.search.workers.build_supervisor` reads them)."""
    p.add_argument(
        "--gpus",
        metavar="LIST",
        help="GPUs to use: indices like 0,1,3 (as CUDA numbers them), or all; one worker process "
        "per GPU slot (default: none, run on CPU)",
    )
    p.add_argument(
        "--trials-per-gpu",
        type=int,
        metavar="K",
        default=1,
        help="processes, so concurrent trials, per GPU (default 1)",
    )
    p.add_argument("--workers", type=int, metavar="N", help="CPU processes when --gpus is left out (default 1)")
    add_threads_arg(p)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads per worker process, GPU slots too (default: $OMP_NUM_THREADS, else the cores "
        "this process may use divided among its processes)",
    )


def storage_from_file() -> str | None:
    """The storage URL in the file ``$KOOPMAN_STORAGE_FILE`` names (its first line), or None when unset."""
    name = os.environ.get(STORAGE_FILE_ENV)
    if not name:
        return None
    try:
        with open(name, encoding="utf-8") as fh:
            url = fh.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(
            f"${STORAGE_FILE_ENV} must name a readable UTF-8 file holding the storage URL, but got "
            f"{STORAGE_FILE_ENV}={name!r} ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    if not url:
        raise SpecError(f"${STORAGE_FILE_ENV} names an empty file, but got {STORAGE_FILE_ENV}={name!r}")
    return url


def spec_with_overrides(spec: StudySpec, args: argparse.Namespace) -> StudySpec:
    """The study file with the storage and artifact store from flags or the environment."""
    from koopman_search.search.studyfile.urls import resolve_artifacts, resolve_storage_url

    # a flag or variable is checked like the file's own key: an in-memory SQLite, a storage or artifact
    # store of an unknown kind is refused here, before anything is written
    storage, artifacts = spec.storage_url, spec.artifacts_dir
    for value, origin in (
        (getattr(args, "storage", None), "--storage"),
        (os.environ.get(STORAGE_ENV), f"${STORAGE_ENV}"),
        (storage_from_file(), f"${STORAGE_FILE_ENV}"),
    ):
        if value:
            storage = resolve_storage_url(value, spec.name, origin, Path.cwd())
            break
    for value, origin in (
        (getattr(args, "artifacts", None), "--artifacts"),
        (os.environ.get(ARTIFACTS_ENV), f"${ARTIFACTS_ENV}"),
    ):
        if value:
            artifacts = resolve_artifacts(value, spec.name, origin, Path.cwd())
            break
    return dataclasses.replace(spec, storage_url=storage, artifacts_dir=artifacts)


@dataclass(frozen=True)
class StudyTarget:
    storage_url: str
    study_name: str
    spec: StudySpec | None


def resolve_target(args: argparse.Namespace) -> StudyTarget:
    """The study a read-only command looks at: a study file, or ``--study-name`` with a storage."""
    if getattr(args, "study", None):
        spec = spec_with_overrides(load_spec(args.study), args)
        name = getattr(args, "study_name", None) or spec.name
        return StudyTarget(spec.storage_url, name, spec)
    url = getattr(args, "storage", None) or os.environ.get(STORAGE_ENV) or storage_from_file()
    name = getattr(args, "study_name", None)
    if not name or not url:
        raise SpecError(
            "name a study: give STUDY.toml, or --study-name NAME with --storage URL "
            f"(or ${STORAGE_ENV}), but got {f'--study-name {name}' if name else 'no study name'} and "
            f"{'a storage' if url else 'no storage'}"
        )
    return StudyTarget(url, name, None)


def check_counts(args: argparse.Namespace) -> None:
    """``--n-trials``, ``--max-trials``, ``--workers``, ``--trials-per-gpu`` and ``--threads`` are at least 1 when
    given."""
    for name in ("n_trials", "max_trials", "workers", "trials_per_gpu", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SpecError(f"--{name.replace('_', '-')} must be >= 1, but got {name}={value}")


def use_threads(threads: int | None) -> int:
    """This process as the one worker slot: torch's threads from ``--threads``, else ``$OMP_NUM_THREADS``, else
    every core it may use (search/workers/slots.py). Returns the count set."""
    from koopman_search.search.workers.slots import omp_threads, threads_per_slot
    from koopman_search.trainer.threads import set_torch_threads

    return set_torch_threads(threads_per_slot(1, threads=threads or omp_threads()))


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)


def waiting_trials(study: Any, cap: int | None = None) -> int:
    """The trials a worker command expects to run: the study's queue (WAITING), at most ``cap``."""
    from optuna.trial import TrialState

    n = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    return n if cap is None else min(n, cap)


def refuse_proxy(url: str, command: str) -> None:
    """``create`` and ``launch`` queue the study's budget under a database lock, which the storage proxy cannot
    hold: refused with one line (exit 2) before anything is written."""
    if url.startswith("grpc://"):
        raise ConfigError(
            f"{command} queues the study's trials under a database lock that the storage proxy cannot hold, but "
            f"got storage={url!r}; run {command} with the database's own URL (postgresql+psycopg://...) and "
            "start the workers with --storage grpc://HOST:PORT"
        )
