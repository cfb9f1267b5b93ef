"""``koopman-search worker``: run an existing study's trials on this machine, one process per GPU slot."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from koopman_search.search.cli._common import (
    add_study_args,
    add_worker_args,
    check_counts,
    spec_with_overrides,
    waiting_trials,
)
from koopman_search.search.errors import SpecError, StudyNotFoundError
from koopman_search.search.studyfile.spec import load_spec
from koopman_search.search.studyfile.urls import redact_url

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EXAMPLE = """examples:
  export KOOPMAN_STORAGE_FILE=/run/secrets/storage-url   # holds postgresql+psycopg://koopman:PASS@db/koopman
  koopman-search create studies/wikitext2.toml
  koopman-search worker studies/wikitext2.toml --gpus all --trials-per-gpu 2
  koopman-search worker studies/quickstart.toml --workers 2          # two CPU processes

The study's trial budget is shared: start the same command on every machine, with the same storage URL
and artifact store, and together they run the study's trials once each. Status lines (one per process)
go to stderr, each finished trial to stdout. SIGTERM or Ctrl-C: every trial finishes its epoch,
checkpoints and is queued to resume; press Ctrl-C again to stop at once. A process that crashes is
started again; its trial is queued again at once and resumes from its last checkpoint.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "worker",
        help="run a study's trials here, one process per GPU slot",
        description="Pull trials from an existing study (made by `create` or `launch`) until its queue is "
        "empty. Starts one process per GPU slot (each GPU x --trials-per-gpu, pinned with "
        "CUDA_VISIBLE_DEVICES), or --workers processes on CPU when --gpus is left out.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_args(p)
    add_worker_args(p)
    p.add_argument(
        "--max-trials",
        type=int,
        metavar="N",
        help="run at most N trials from this command, split over its processes (default: until "
        "the study's queue is empty); the study's budget stays as create/launch --n-trials set it",
    )
    # --n-trials is the study's budget in every command; a worker does not set it. Caught to say so, since
    # this command once used the name for its own cap (now --max-trials).
    p.add_argument("--n-trials", type=int, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.engine.study import check_stored_definition, load_study
    from koopman_search.search.storage.artifacts import check_artifacts
    from koopman_search.search.storage.database import open_storage
    from koopman_search.search.workers import build_supervisor
    from koopman_search.trainer.data import check_source

    if args.n_trials is not None:
        raise SpecError(
            f"worker takes no --n-trials (got n_trials={args.n_trials}): --n-trials is the study's budget, set "
            "by create or launch; --max-trials N caps the trials this command runs"
        )
    check_counts(args)
    spec = spec_with_overrides(load_spec(args.study), args)  # validated before any storage is touched
    supervisor = build_supervisor(
        spec,
        gpus=args.gpus,
        trials_per_gpu=args.trials_per_gpu,
        workers=args.workers,
        max_trials=args.max_trials,
        threads=args.threads,
    )
    check_source(spec.trainer.data.source)  # this command trains: its data must be here
    check_artifacts(spec.artifacts_dir)  # before the database is written
    storage = open_storage(spec.storage_url, heartbeat=False)
    try:
        study = load_study(storage, spec.name)
        check_stored_definition(study, spec)  # the file the workers run is the one the study was made from
        supervisor.expect_trials(waiting_trials(study, args.max_trials))
    except StudyNotFoundError:
        raise StudyNotFoundError(
            f"study {spec.name!r} does not exist in {redact_url(spec.storage_url)}; create it first with "
            f"`koopman-search create {args.study}` (or `koopman-search launch {args.study}`), using the "
            "same --storage"
        ) from None
    finally:
        close = getattr(storage, "close", None) or storage.engine.dispose  # close(): a storage proxy
        close()
    return supervisor.run()
