"""``koopman-search best``: the best trial, or the Pareto front of a two-objective study."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

from search.cli._common import add_study_args, render_table, resolve_target
from search.errors import StudyNotFoundError

if TYPE_CHECKING:
    import optuna

__all__ = ["add_parser", "print_best", "run"]

logger = logging.getLogger(__name__)

EXAMPLE = """examples:
  koopman-search best studies/quickstart.toml
  koopman-search best studies/quickstart.toml --format toml > best.toml
  koopman-search train --config best.toml
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "best", help="show the best trial or the Pareto front; export it as a trainer config",
        description="The best trial (one objective) or the Pareto front (several). With --format toml, "
                    "a trainer config of the best trial (or --trial N) for `koopman-search train --config`.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, file_required=False)
    p.add_argument("--format", choices=("table", "json", "toml"), default="table", help="output format")
    p.add_argument("--trial", type=int, metavar="N",
                   help="with --format toml: export trial N (default: the best, or the Pareto trial with "
                        "the best first objective)")
    return p


def run(args: argparse.Namespace) -> int:
    from search.storage import open_storage
    from search.study import load_study

    target = resolve_target(args)
    study = load_study(open_storage(target.storage_url, heartbeat=False), target.study_name)
    print_best(study, args.format, args.trial)
    return 0


def print_best(study: optuna.Study, output: str = "table", trial: int | None = None) -> None:
    """Print the best trial or the Pareto front of ``study`` as ``output`` (table, json), or as ``toml`` the
    trainer config of trial ``trial`` (default: the best)."""
    from search.export import trial_config_toml
    from search.review.stored import objective_names
    from search.review.summary import best_trials

    best = best_trials(study)
    names = objective_names(study)
    if output == "toml":
        if trial is not None:
            matches = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
            if not matches:
                raise StudyNotFoundError(f"study {study.study_name} has no trial {trial}")
            frozen = matches[0]
        elif best:
            frozen = study.get_trials(deepcopy=False)[best[0].number]
        else:
            raise StudyNotFoundError(f"study {study.study_name} has no complete trial yet")
        print(trial_config_toml(study, frozen), end="")
        return
    rows: list[dict[str, Any]] = [{"number": t.number, "label": t.label, "params": t.params,
             "values": dict(zip(names, t.values or (), strict=False)), "epochs_run": t.epochs_run} for t in best]
    if output == "json":
        kind = "pareto_front" if len(study.directions) > 1 else "best"
        print(json.dumps({"study": study.study_name, kind: rows}, indent=2))
        return
    if not rows:
        print(f"study {study.study_name}: no complete trial yet")
        return
    title = ("Pareto front" if len(study.directions) > 1 else "best trial") + f" of study {study.study_name}"
    params = sorted({k for r in rows for k in r["params"]})
    table = render_table(
        ["#", *params, *names, "label"],
        [[str(r["number"]), *[_cell(r["params"].get(p)) for p in params],
          *[_cell(r["values"].get(n)) for n in names], r["label"] or ""] for r in rows])
    print(f"{title}:\n{table}")


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.5g}" if isinstance(v, float) else str(v)
