"""``koopman-search report``: one self-contained HTML file about a study, to open offline or send around."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from koopman_search.search.cli._common import add_study_args, resolve_target
from koopman_search.search.cli.out_file import check_out, own_files

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


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.engine.study import load_study
    from koopman_search.search.review.open import open_existing_storage
    from koopman_search.search.review.report import write_report

    out = Path(args.out)
    target = resolve_target(args)
    check_out(out, own_files(args, target))
    study = load_study(open_existing_storage(target.storage_url, read_only=True), target.study_name)
    logger.info("report of study %s (%d trials)", study.study_name, len(study.get_trials(deepcopy=False)))
    write_report(study, out)
    return 0
