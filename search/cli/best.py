"""``koopman-search best``: the best trial, or the Pareto front of a two-objective study."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from koopman_search.search.cli._common import add_study_args, render_table, resolve_target
from koopman_search.search.cli._output import add_format_args, dump, param_header, param_legend, param_order
from koopman_search.search.errors import StudyNotFoundError
from koopman_search.search.text import number, printable

if TYPE_CHECKING:
    import optuna

__all__ = ["add_parser", "print_best", "run"]

logger = logging.getLogger(__name__)

HAND_TUNED = "★"  # the mark of a labelled [[enqueue]] trial, here and in the figures (search/review/figures.py)

EXAMPLE = """examples:
  koopman-search best studies/quickstart.toml
  koopman-search best studies/quickstart.toml --format toml > /tmp/best.toml
  koopman-search best studies/quickstart.toml --trial 3 -f json
  koopman-search train --config /tmp/best.toml
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "best",
        help="show the best trial or the Pareto front; export it as a trainer config",
        description="The best trial (one objective) or the Pareto front (several), and which of them "
        "--format toml exports and why. With --format toml, a trainer config of that trial (or "
        "--trial N) for `koopman-search train --config`.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_args(p, file_required=False)
    add_format_args(p, extra=("toml",))
    p.add_argument(
        "--trial",
        type=int,
        metavar="N",
        help="show (or with --format toml export) trial N instead (default: the best, or the "
        "Pareto trial with the best first objective)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.engine.study import load_study
    from koopman_search.search.review.open import open_existing_storage

    target = resolve_target(args)
    study = load_study(open_existing_storage(target.storage_url, read_only=True), target.study_name)
    print_best(study, args.format, args.trial, full_names=args.full_names)
    return 0


def print_best(study: optuna.Study, output: str = "table", trial: int | None = None, full_names: bool = False) -> None:
    """Print the best trial or the Pareto front of ``study`` (or trial ``trial``) as ``output`` (table,
    json, csv, yaml), or as ``toml`` the trainer config of that trial; say which trial is chosen and why."""
    from koopman_search.search.review.export import trial_config_toml
    from koopman_search.search.review.status import status_data
    from koopman_search.search.review.summary import best_trials

    data = status_data(study)
    by_number = {t["number"]: t for t in data["trials"]}
    names: list[str] = data["objectives"]
    best = best_trials(study)
    multi = len(study.directions) > 1
    if trial is not None:
        if trial not in by_number:
            raise StudyNotFoundError(
                f"study {study.study_name} has no trial {trial}, but got --trial {trial}; "
                f"its trials are numbered 0..{len(by_number) - 1}"
                if by_number
                else f"study {study.study_name} has no trial yet, but got --trial {trial}"
            )
        chosen: int | None = trial
        why = f"trial {trial}, as asked with --trial {trial}"
        shown = [by_number[trial]]
    else:
        chosen = best[0].number if best else None
        why = _why(study, names, [t.number for t in best]) if best else ""
        shown = [by_number[t.number] for t in best]
    if output == "toml":
        if chosen is None:
            raise StudyNotFoundError(f"study {study.study_name} has no complete trial yet; nothing to export")
        frozen = study.get_trials(deepcopy=False)[chosen]
        print(f"# exported: {why}")
        print(trial_config_toml(study, frozen), end="")
        print(f"exported {why}", file=sys.stderr)
        return
    kind = "trials" if trial is not None else "pareto_front" if multi else "best"
    if output != "table":
        result = {
            "study": study.study_name,
            "objectives": names,
            kind: shown,
            "chosen": None if chosen is None else {"number": chosen, "why": why},
        }
        print(dump(result, output, shown))
        return
    if not shown:
        print(f"study {study.study_name}: no complete trial yet")
        return
    title = f"trial {trial}" if trial is not None else "Pareto front" if multi else "best trial"
    marked = chosen if multi and trial is None else None
    lines = [f"{title} of study {study.study_name}:", *_table_lines(shown, names, marked, full_names)]
    if chosen is not None and trial is None:
        lines.append(f"--format toml exports {why}" + (" (→)" if multi else ""))
    print("\n".join(lines))


def _table_lines(shown: list[dict[str, Any]], names: list[str], marked: int | None, full_names: bool) -> list[str]:
    """The trials as a table, the exported one marked →, a hand-tuned one ★, and the legends under it."""
    params = param_order(k for r in shown for k in r["params"])
    table = render_table(
        ["#", *[param_header(p, full_names) for p in params], *names, "label"],
        [
            [
                ("→" if r["number"] == marked else "") + str(r["number"]),
                *[_cell(r["params"].get(p)) for p in params],
                *[_cell((r["values"] or {}).get(n)) for n in names],
                f"{HAND_TUNED} {printable(r['label'])}" if r["label"] else "",
            ]
            for r in shown
        ],
    )
    lines = [table]
    legend = param_legend(params, full_names)
    if legend:
        lines.append(legend)
    if any(r["label"] for r in shown):
        lines.append(
            f"{HAND_TUNED} a hand-tuned trial: one of the study file's [[enqueue]] entries (★ in the figures too)"
        )
    return lines


def _why(study: optuna.Study, names: list[str], front: list[int]) -> str:
    """Which trial the export takes by default, and why."""
    import optuna

    lowest = "lowest" if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else "highest"
    if len(study.directions) == 1:
        return f"trial {front[0]}, the best trial (the {lowest} {names[0]})"
    others = ", ".join(f"#{n}" for n in front)
    return (
        f"trial {front[0]}: of the {len(front)} trial(s) on the Pareto front ({others}) the one with the "
        f"{lowest} {names[0]}, the first objective; export another with --trial N"
    )


def _cell(v: Any) -> str:
    return number(v) if v is None or isinstance(v, (int, float)) else printable(str(v))
