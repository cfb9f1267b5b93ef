"""``koopman-search report``: one self-contained HTML file about a study, to open offline or send around."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from search.cli._common import add_study_args, resolve_target
from trainer.errors import ConfigError

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  koopman-search report studies/quickstart.toml --out report.html
  koopman-search report --study-name wikitext2-koopman --storage sqlite:///studies/wikitext2-koopman.db

The file holds plotly.js itself (about 5 MB), so it opens without a network connection. Nothing is
re-run: every figure comes from what the trials stored.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a study",
        description="Write one HTML file with the study's summary, best trial or Pareto front, optimization "
        "history, parameter importances, parallel coordinates, per-trial curves, prune reasons and the "
        "best trial's trainer config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_args(parser, file_required=False)
    parser.add_argument(
        "--out", default="report.html", metavar="FILE", help="the HTML file to write (default: report.html)"
    )
    return parser


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise ConfigError(f"--out must be a file path, but got out={str(out)!r}, which is a directory")
    if not out.parent.is_dir():
        raise ConfigError(
            f"--out must be in an existing directory, but got out={str(out)!r} "
            f"(no directory {str(out.parent)!r}); create it first"
        )
    try:  # a directory we cannot write to (read-only, /proc) is found before the study is read
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".report-", suffix=".probe"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--out must be in a directory this process can write to, but got out={str(out)!r} ({exc.strerror or exc})"
        ) from None


def run(args: argparse.Namespace) -> int:
    from search.review.open import open_existing_storage
    from search.review.report import write_report
    from search.study import load_study

    out = Path(args.out)
    _check_out(out)
    target = resolve_target(args)
    study = load_study(open_existing_storage(target.storage_url), target.study_name)
    logger.info("report of study %s (%d trials)", study.study_name, len(study.get_trials(deepcopy=False)))
    write_report(study, out)
    return 0
