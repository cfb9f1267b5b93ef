"""``koopman-search launch``: create the study if needed, compute the baseline, run the trials."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from koopman_search.search.cli._common import (
    add_budget_arg,
    add_redefine_arg,
    add_study_args,
    add_worker_args,
    check_counts,
    refuse_proxy,
    spec_with_overrides,
    use_threads,
    waiting_trials,
)
from koopman_search.search.studyfile.spec import load_spec
from koopman_search.search.studyfile.urls import redact_url
from koopman_search.trainer.errors import ConfigError

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EXAMPLE = """examples:
  koopman-search launch studies/quickstart.toml
  koopman-search launch studies/wikitext2.toml --gpus all --trials-per-gpu 2
  export OPTUNA_STORAGE=postgresql+psycopg://koopman:PASS@db/koopman    # a password: never in --storage
  koopman-search launch studies/wikitext2.toml --workers 4

Ctrl-C stops at once: the running trial is queued again and resumes from its last checkpoint when the
same command runs again.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "launch",
        help="create a study (if needed) and run its trials here",
        description="Create the study if absent (idempotent), queue the listed trials once, make sure the "
        "baseline exists, then run trials until the study's budget is used. Ends with the "
        "table of trials and the best result.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_args(p)
    add_budget_arg(p)
    add_worker_args(p)
    p.add_argument("--device", metavar="D", help="override the study's trainer device (cpu, cuda, auto)")
    p.add_argument("--rerun-baseline", action="store_true", help="run the baseline again after it failed")
    add_redefine_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.cli.status import status_text
    from koopman_search.search.engine.study import create_or_load_study, ensure_budget
    from koopman_search.search.review.status import status_data
    from koopman_search.search.storage.artifacts import check_artifacts
    from koopman_search.search.storage.database import open_storage
    from koopman_search.trainer.data import check_source

    check_counts(args)
    if args.device and (args.gpus or (args.workers or 1) > 1):
        raise ConfigError(
            "--device applies to a launch in one process; with --workers every slot trains on the CPU and with "
            f"--gpus each on its own GPU, but got device={args.device!r} with "
            + (f"gpus={args.gpus!r}" if args.gpus else f"workers={args.workers}")
            + "; leave --device out"
        )
    spec = spec_with_overrides(load_spec(args.study), args)  # validated before any storage is touched
    refuse_proxy(spec.storage_url, "launch")
    spec = spec.with_device(args.device)
    supervisor = None
    if args.gpus or (args.workers or 1) > 1:  # --gpus/--workers checked before any storage is touched
        from koopman_search.search.workers import build_supervisor

        supervisor = build_supervisor(
            spec, gpus=args.gpus, trials_per_gpu=args.trials_per_gpu, workers=args.workers, threads=args.threads
        )
    check_source(spec.trainer.data.source)  # this command trains: its data must be here
    check_artifacts(spec.artifacts_dir)  # before the database is written
    storage = open_storage(spec.storage_url)
    study, created = create_or_load_study(spec, storage, redefine=args.redefine)
    ensure_budget(study, spec, args.n_trials)
    logger.info("study %s %s in %s", spec.name, "created" if created else "loaded", redact_url(spec.storage_url))
    if args.rerun_baseline:
        from koopman_search.search.engine.baseline import rerun_baseline

        if rerun_baseline(spec, storage):
            logger.info("baseline queued to run again")
    lost: list[int] = []
    if supervisor is not None:
        supervisor.expect_trials(waiting_trials(study))
        code = supervisor.run()
        interrupted = supervisor.stop_requested
        failed = code != 0 and not interrupted  # a slot stopped for good, or a trial was lost: said above
    else:
        use_threads(args.threads)
        interrupted, failed = _run_with_progress(spec, study, lost), False
    _annotate(study, spec)
    print()
    print(status_text(status_data(study)))
    return _ending(args, study, lost, failed, interrupted)


def _run_with_progress(spec: Any, study: Any, lost: list[int]) -> bool:
    """The worker loop in this process, with its progress shown; True when it was stopped."""
    from koopman_search.search.engine.runner import format_outcome
    from koopman_search.search.workers.progress import LiveProgress

    progress = LiveProgress(waiting_trials(study), format_outcome=lambda o: format_outcome(o, spec.metrics))
    with progress.session():
        return _run_here(
            spec,
            progress.on_outcome,
            lost,
            on_trial_start=progress.on_trial_start,
            on_epoch=progress.on_epoch,
            on_baseline_epoch=progress.on_baseline_epoch,
            on_step=progress.on_step,
        )


def _ending(args: argparse.Namespace, study: Any, lost: list[int], failed: bool, interrupted: bool) -> int:
    """The run's last words and exit code: 1 when a trial was lost or a slot stopped for good, 130 when it
    was interrupted (its unfinished trials are queued), else the best trials and 0."""
    from koopman_search.search.cli.best import print_best

    if lost:
        print(
            f"koopman-search launch: error: {len(lost)} trial(s) lost to environment faults (trial "
            f"{', '.join(map(str, lost))}); see the errors above",
            file=sys.stderr,
        )
        return 1
    if failed:
        print(
            "koopman-search launch: error: a worker process stopped for good or a trial was lost; see the errors above",
            file=sys.stderr,
        )
        return 1
    if not interrupted:
        print_best(study, "table")
        return 0
    print(
        f"interrupted: unfinished trials are queued; run `koopman-search launch {args.study}` again to continue",
        file=sys.stderr,
    )
    return 130


def _run_here(spec: Any, on_outcome: Any, lost: list[int], **callbacks: Any) -> bool:
    """The worker loop in this process. SIGTERM stops it after the running epoch (the trial is handed back
    to resume from its checkpoint), a second SIGTERM or Ctrl-C at once. True when it was stopped; ``lost``
    gets the numbers of the trials lost to environment faults."""
    import secrets
    import signal
    import threading

    from koopman_search.search.errors import BaselineError
    from koopman_search.search.workers import run_worker
    from koopman_search.search.workers.supervisor import SEED_OFFSET_RANGE

    stop = threading.Event()

    def on_sigterm(_signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt("SIGTERM received twice")
        logger.warning("SIGTERM: stopping after this epoch; the trial is queued to resume (again to stop at once)")
        stop.set()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        # a fresh sampler seed per launch: a relaunch, or launches side by side, must not repeat proposals
        summary = run_worker(
            spec, seed_offset=secrets.randbelow(SEED_OFFSET_RANGE), stop=stop, on_outcome=on_outcome, **callbacks
        )
        lost[:] = [o.number for o in summary.lost]
        return summary.interrupted
    except KeyboardInterrupt:
        return True
    except BaselineError:
        if stop.is_set():  # stopped while the baseline ran or was waited for; it resumes on the next run
            return True
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _annotate(study: Any, spec: Any) -> None:
    """The study's dashboard note and figures, so that plain `optuna-dashboard URL` shows them too."""
    import optuna
    import sqlalchemy

    from koopman_search.search.review import annotate_study
    from koopman_search.search.storage.artifacts import open_artifact_store
    from koopman_search.trainer.errors import KoopmanError

    try:
        annotate_study(study, open_artifact_store(spec.artifacts_dir))
    except (
        optuna.exceptions.OptunaError,
        sqlalchemy.exc.SQLAlchemyError,
        KoopmanError,
        ValueError,
        TypeError,
        KeyError,
    ):  # the review is a side product: it must not fail a finished search
        logger.warning("could not write the study's dashboard note and figures", exc_info=True)
