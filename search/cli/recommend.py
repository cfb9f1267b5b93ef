"""``koopman-search recommend``: the study's answer in the form of the researcher's hand-tuning report."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from koopman_search.search.cli._common import add_study_args, resolve_target
from koopman_search.search.cli.out_file import check_out, own_files
from koopman_search.trainer.errors import KoopmanError

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  koopman-search recommend studies/quickstart.toml
  koopman-search recommend studies/quickstart.toml --lang ja --out recommendation-ja.md

Markdown: the baseline; the problems found (each rule's closest approach, a Koopman weight that bought
nothing, a fallback that never acted, K growing, φ collapsing or shrinking, failed trials); three options
from the Pareto front (conservative: the best first objective; balanced: the front's knee; aggressive: the
best second objective), each with its settings, its effect against the baseline, the arithmetic of its last
epoch, its curve and its trainer config; then the success and retune indicators (total loss < 6.5, at most
7.0; val_ppl under the ratio limit; LM loss within 2% of the baseline's; Koopman loss falling; at most one
fallback cut per epoch), checked against the records. Nothing is re-run.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "recommend",
        help="the study's answer as a report: problems, three options, the success indicators",
        description="The study's answer in the form of a hand-tuning report: the baseline, the problems "
        "found, three options from the Pareto front with their settings, effects and arithmetic, and the "
        "success and retune indicators checked against the records. Markdown on stdout, or --out FILE.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_args(parser, file_required=False)
    parser.add_argument("--lang", choices=("en", "ja"), default="en", help="the report's language (default: en)")
    parser.add_argument("--out", metavar="FILE", help="write the Markdown to FILE instead of stdout")
    return parser


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.engine.study import load_study
    from koopman_search.search.review.export import trial_config_toml
    from koopman_search.search.review.open import open_existing_storage
    from koopman_search.search.review.recommend import recommendation
    from koopman_search.search.review.recommend_text import render
    from koopman_search.trainer.checkpoint import atomic_write

    target = resolve_target(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out(out, own_files(args, target))
    study = load_study(open_existing_storage(target.storage_url, read_only=True), target.study_name)
    rec = recommendation(study)
    frozen = study.get_trials(deepcopy=False)
    configs = {o.trial.number: trial_config_toml(study, frozen[o.trial.number]) for o in rec.options}
    text = render(rec, configs, args.lang)
    if out is None:
        sys.stdout.write(text)
        return 0
    try:
        atomic_write(out, lambda fh: fh.write(text.encode("utf-8")), parents=False)
    except OSError as exc:
        raise KoopmanError(f"could not write the recommendation, but got out={out}: {exc.strerror}") from exc
    logger.info("wrote %s", out)
    return 0
