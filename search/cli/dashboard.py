"""``koopman-search dashboard``: optuna-dashboard on a study's storage, with notes, figures and artifacts."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from koopman_search.search.cli._common import ARTIFACTS_ENV, STORAGE_ENV, add_storage_args, spec_with_overrides
from koopman_search.trainer.errors import ConfigError

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  koopman-search dashboard studies/quickstart.toml            # then open http://127.0.0.1:8080
  koopman-search dashboard --storage postgresql+psycopg://user@db/koopman --port 8081
  koopman-search dashboard studies/quickstart.toml --host 0.0.0.0   # reachable from other machines

Before serving, every finished trial gets its note and each study its figures (trial curves, Pareto
front), all from the stored records; this is repeated every --refresh seconds while studies run.
With a study file (or --study-name) that study is annotated; with only --storage, every koopman-search
study in it. The dashboard itself shows every study in the storage.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dashboard",
        help="serve optuna-dashboard on a study's storage",
        description="Serve optuna-dashboard on the study's storage with the artifact store attached, after "
        "writing each trial's note and the study's figures from the stored records.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", nargs="?", metavar="STUDY.toml", help="the study file")
    parser.add_argument(
        "--study-name", metavar="NAME", help="annotate only this study (default: the study file's, else all)"
    )
    add_storage_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    parser.add_argument(
        "--refresh",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="re-annotate new trials this often while serving (default: 60; 0: only at start)",
    )
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.engine.study import load_study
    from koopman_search.search.review.dashboard import Refresher, annotate_storage, is_loopback, make_server_for
    from koopman_search.search.review.open import open_existing_storage
    from koopman_search.search.storage.artifacts import open_artifact_store
    from koopman_search.search.studyfile.spec import load_spec

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, but got port={args.port}")
    if args.refresh < 0:
        raise ConfigError(f"--refresh must be >= 0 seconds, but got refresh={args.refresh}")
    study_names: list[str] | None
    if args.study:
        spec = spec_with_overrides(load_spec(args.study), args)
        url, artifacts, study_names = spec.storage_url, spec.artifacts_dir, [args.study_name or spec.name]
    else:
        url = args.storage or os.environ.get(STORAGE_ENV, "")
        artifacts = args.artifacts or os.environ.get(ARTIFACTS_ENV) or ""
        study_names = [args.study_name] if args.study_name else None
    storage = open_existing_storage(url)
    if study_names is not None:
        load_study(storage, study_names[0])  # a missing study is an error, not an empty dashboard
    store = open_artifact_store(artifacts) if artifacts else None
    annotate_storage(storage, study_names, store)  # with the store: each trial note opens with its curves
    if not is_loopback(args.host):
        logger.warning(
            "serving on %s: the dashboard is reachable from other machines and has no login; "
            "anyone who can reach it can edit notes and delete studies",
            args.host,
        )
    try:
        server = make_server_for(storage, args.host, args.port, store)
    except OSError as exc:
        raise ConfigError(
            f"the dashboard cannot listen on {args.host}:{args.port}, but got {exc.strerror or exc}; "
            "pick another --port or --host"
        ) from None
    refresher = Refresher(storage, study_names, args.refresh, store) if args.refresh > 0 else None
    if refresher is not None:
        refresher.start()
    logger.info("optuna-dashboard at %s (artifacts: %s); Ctrl-C to stop", server.url, artifacts or "none")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `docker stop` ends it like Ctrl-C: cleanly, exit 0
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        if refresher is not None:
            refresher.stop()
        server.server_close()
    return 0
