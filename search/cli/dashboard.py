"""``koopman-search dashboard``: optuna-dashboard on a study's storage, with notes, figures and artifacts."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from search.cli.report import resolve_study
from search.review.dashboard import Refresher, annotate_storage, is_loopback, make_server_for
from search.review.open import open_storage, open_study
from trainer.errors import ConfigError

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  koopman-search dashboard studies/quickstart.toml            # then open http://127.0.0.1:8080
  koopman-search dashboard --storage postgresql+psycopg://user@db/koopman --port 8081
  koopman-search dashboard studies/quickstart.toml --host 0.0.0.0   # reachable from other machines

Before serving, every finished trial gets its note and the study its figures (trial curves, Pareto
front); this is repeated every --refresh seconds while the study runs.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dashboard",
        help="serve optuna-dashboard on a study's storage",
        description="Serve optuna-dashboard on the study's storage with the artifact store attached, after "
        "writing each trial's note and the study's figures from the stored records.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "study", nargs="?", metavar="STUDY.toml", help="the study file (gives storage, artifacts)"
    )
    parser.add_argument("--storage", help="storage URL (default: the study file's, else $OPTUNA_STORAGE)")
    parser.add_argument("--artifacts", help="artifact directory (default: the study file's)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine)"
    )
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    parser.add_argument(
        "--refresh",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="re-annotate new trials this often while serving (default: 60; 0: only at start)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, but got port={args.port}")
    if args.refresh < 0:
        raise ConfigError(f"--refresh must be >= 0 seconds, but got refresh={args.refresh}")
    url, name, spec_artifacts = resolve_study(args)
    storage = open_storage(url)
    study_names = [open_study(storage, name, url).study_name] if name else None
    artifacts = args.artifacts or spec_artifacts
    if artifacts and artifacts.startswith("s3://"):
        logger.warning(
            "artifacts at %s are not attached: the dashboard command serves directories only", artifacts
        )
        artifacts = None
    annotate_storage(storage, study_names)
    if not is_loopback(args.host):
        logger.warning(
            "serving on %s: the dashboard is reachable from other machines and has no login; "
            "anyone who can reach it can edit notes and delete studies",
            args.host,
        )
    try:
        server = make_server_for(storage, args.host, args.port, artifacts)
    except OSError as exc:
        raise ConfigError(
            f"the dashboard cannot listen on {args.host}:{args.port}, but got {exc.strerror or exc}; "
            "pick another --port or --host"
        ) from None
    refresher = Refresher(storage, study_names, args.refresh) if args.refresh > 0 else None
    if refresher is not None:
        refresher.start()
    logger.info(
        "optuna-dashboard at %s (artifacts: %s); Ctrl-C to stop", server.url, artifacts or "not attached"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopped")
    finally:
        if refresher is not None:
            refresher.stop()
        server.server_close()
    return 0
