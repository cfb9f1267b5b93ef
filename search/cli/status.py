"""``koopman-search status``: every trial of a study, and what the study has spent."""

from __future__ import annotations

import argparse
import logging
import textwrap
from typing import Any

from koopman_search.search.cli._common import add_study_args, render_table, resolve_target
from koopman_search.search.cli._output import add_format_args, dump, param_header, param_legend, param_order
from koopman_search.search.text import number, printable

__all__ = ["add_parser", "run", "status_text"]

logger = logging.getLogger(__name__)

TABLE_WIDTH = 120  # the table's width by default: a terminal and a code review both show it whole

EXAMPLE = """examples:
  koopman-search status studies/quickstart.toml
  koopman-search status --study-name wikitext2-koopman --storage postgresql+psycopg://... --format json
  koopman-search status studies/quickstart.toml -f csv > trials.csv
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "status",
        help="list a study's trials and totals",
        description="Every trial with state, parameters, epochs run, final metrics and prune reason; then "
        "the study's totals (complete / pruned / failed, epochs spent and saved).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_args(p, file_required=False)
    add_format_args(p)
    p.add_argument(
        "--wide",
        action="store_true",
        help=f"the table with every metric and whole notes (default: the objectives and total_loss, within "
        f"{TABLE_WIDTH} columns)",
    )
    return p


def _cell(v: Any) -> str:
    return number(v) if v is None or isinstance(v, (int, float)) else printable(str(v))


def _metrics(data: dict[str, Any], wide: bool) -> list[str]:
    """The metric columns: every shown metric with ``wide``, else total_loss (the rule's) and the objectives."""
    from koopman_search.search.review.status import SHOWN_METRICS

    if wide:
        return list(SHOWN_METRICS)
    return [m for m in SHOWN_METRICS if m == "total_loss" or m in data["objectives"]]


def _fit(headers: list[str], rows: list[list[str]], width: int) -> str:
    """The table within ``width`` columns: with its last column (the note) where every note fits, else without
    it and each trial's note whole on lines of its own under the table (wrapped at ``width``)."""
    whole = render_table(headers, rows)
    if max(len(line) for line in whole.splitlines()) <= width:
        return whole
    lines = [render_table(headers[:-1], [r[:-1] for r in rows])]
    for r in rows:
        if r[-1]:
            lines.append(textwrap.fill(f"#{r[0]}: {r[-1]}", width, subsequent_indent="    "))
    return "\n".join(lines)


def status_text(data: dict[str, Any], full_names: bool = False, wide: bool = False) -> str:
    """``data`` (:func:`koopman_search.search.review.status.status_data`) as the table that ``status`` prints:
    within :data:`TABLE_WIDTH` columns, or every metric and whole notes with ``wide``."""
    metrics = _metrics(data, wide)
    names = param_order(k for t in data["trials"] for k in t["params"])
    headers = ["#", "state", *[param_header(n, full_names) for n in names], "epochs", *metrics, "note"]
    rows = []
    for t in data["trials"]:
        epochs = str(t["epochs_run"]) + (f"+{t['epochs_from_warmup']}w" if t["epochs_from_warmup"] else "")
        note = printable(t["prune_reason"] or t["fail_reason"] or t["label"] or "")
        if t["state"] == "FAIL" and not note and t["retried_as"] is not None:
            note = "worker lost (heartbeat stale)"
        if t["retried_as"] is not None:
            note = "; ".join(filter(None, [note, f"retried as #{t['retried_as']}"]))
        if t["retry_of"] is not None:
            note = f"retry of #{t['retry_of']}" + (f"; {note}" if note else "")
        rows.append(
            [
                str(t["number"]),
                t["state"],
                *[_cell(t["params"].get(n)) for n in names],
                epochs,
                *[_cell(t["final"][m]) for m in metrics],
                note,
            ]
        )
    table = render_table(headers, rows) if wide else _fit(headers, rows, TABLE_WIDTH)
    lines = [f"study {data['study']} (objectives: {', '.join(data['objectives'])})", table]
    legend = param_legend(names, full_names)
    if legend:
        lines.append(legend)
    if data["baseline"]:
        curve = ", ".join(_cell(v) for v in data["baseline"]["val_ppl"])
        lines.append(f"baseline ({data['baseline']['state']}) val PPL per epoch: {curve or '-'}")
        unjudged = data["baseline"].get("total_loss_unjudged_epochs")
        if unjudged:
            lines.append(
                f"total-loss rule: epoch(s) {', '.join(map(str, unjudged))} not judged, the baseline's "
                "own total loss is above total_loss_max there"
            )
    lines.append("epochs: N trained by the trial itself, +Nw taken from the baseline's shared warmup")
    lines.append(data["summary"])
    lines += [f"rule {r['text']}" for r in (data.get("rules") or {}).values()]
    if data.get("tradeoff"):
        lines.append(f"trade-off: {data['tradeoff']}")
    if data.get("noise"):
        lines.append(f"noise: {data['noise']}")
    if data.get("against_baseline"):
        lines.append(f"against the baseline: {data['against_baseline']}")
    if not wide:
        lines.append("--wide for every metric, and the notes in the table")
        lines = lines[:2] + [textwrap.fill(line, TABLE_WIDTH, subsequent_indent="  ") for line in lines[2:]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.engine.study import load_study
    from koopman_search.search.review.open import open_existing_storage
    from koopman_search.search.review.status import status_data

    target = resolve_target(args)
    study = load_study(open_existing_storage(target.storage_url, read_only=True), target.study_name)
    data = status_data(study)
    if args.format == "table":
        print(status_text(data, args.full_names, args.wide))
    else:
        print(dump(data, args.format, data["trials"]))
    return 0
