"""``koopman-search report``: one self-contained HTML file about a study, to open offline or send around."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from search.review.open import open_storage, open_study
from search.review.report import write_report
from trainer.errors import ConfigError

__all__ = ["add_parser", "resolve_study", "run"]

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  koopman-search report studies/quickstart.toml --out report.html
  koopman-search report --study-name wikitext2-koopman --storage sqlite:///studies/wikitext2-koopman.db

The file holds plotly.js itself (about 5 MB), so it opens without a network connection.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a study",
        description="Write one HTML file with the study's summary, best trial or Pareto front, optimization "
        "history, parameter importances, per-trial curves, prune reasons and best config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "study", nargs="?", metavar="STUDY.toml", help="the study file (gives name and storage)"
    )
    parser.add_argument(
        "--study-name", help="the study's name (default: the study file's, or the only study)"
    )
    parser.add_argument("--storage", help="storage URL (default: the study file's, else $OPTUNA_STORAGE)")
    parser.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    return parser


def resolve_study(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """(storage URL, study name, artifacts dir) from the study file, the flags and $OPTUNA_STORAGE;
    flags win over the study file, which wins over the environment."""
    spec = None
    if getattr(args, "study", None):
        from search.spec import load_spec

        spec = load_spec(args.study)
    url = args.storage or (spec.storage_url if spec else "") or os.environ.get("OPTUNA_STORAGE", "")
    name = getattr(args, "study_name", None) or (spec.name if spec else None)
    artifacts = spec.artifacts_dir if spec else None
    return url, name, artifacts


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise ConfigError(f"--out must be a file path, but got out={str(out)!r}, which is a directory")
    parent = out.parent
    if not parent.is_dir():
        raise ConfigError(
            f"--out must be in an existing directory, but got out={str(out)!r} "
            f"(no directory {str(parent)!r}); create it first"
        )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _check_out(out)
    url, name, _ = resolve_study(args)
    storage = open_storage(url)
    study = open_study(storage, name, url)
    logger.info("report of study %s (%d trials)", study.study_name, len(study.get_trials(deepcopy=False)))
    write_report(study, out)
    return 0
