"""How the data commands print: ``-f/--format table|json|csv|yaml``, one shape for a trial everywhere, and
the parameter columns in the README's order (the search space's, :data:`search.studyfile.space.PARAM_NAMES`)."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from koopman_search.search.studyfile.space import PARAM_NAMES
from koopman_search.search.text import csv_cell

__all__ = ["DATA_FORMATS", "add_format_args", "dump", "flat_rows", "param_header", "param_legend", "param_order"]

DATA_FORMATS = ("table", "json", "csv", "yaml")

# the table's short headers; --full-names (and json, csv, yaml) use the parameter names themselves
SHORT_NAMES = {
    "koopman_weight_max": "w_max",
    "koopman_start_epoch": "start",
    "fallback_threshold": "thresh",
    "schedule": "schedule",
    "koopman_dim": "dim",
    "koopman_loss": "loss",
    "koopman_fit": "fit",
}


def add_format_args(p: argparse.ArgumentParser, extra: Sequence[str] = ()) -> None:
    formats = (*DATA_FORMATS, *extra)
    p.add_argument(
        "-f", "--format", choices=formats, default="table", help=f"output format: {', '.join(formats)} (default table)"
    )
    p.add_argument(
        "--full-names",
        action="store_true",
        help="table headers with the parameters' full names (json, csv and yaml always use them)",
    )


def param_order(names: Iterable[str]) -> list[str]:
    """The parameters in the README's order; any others after them, by name."""
    known = {n: i for i, n in enumerate(PARAM_NAMES)}
    return sorted(set(names), key=lambda n: (known.get(n, len(known)), n))


def param_header(name: str, full: bool) -> str:
    return name if full else SHORT_NAMES.get(name, name)


def param_legend(names: Sequence[str], full: bool) -> str | None:
    """The line under a table that names the abbreviated parameters (None with full names)."""
    short = [f"{SHORT_NAMES[n]} = {n}" for n in names if not full and SHORT_NAMES.get(n, n) != n]
    return f"parameters: {', '.join(short)} (--full-names to show them so)" if short else None


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(list(value))
    else:
        out[prefix] = value


def flat_rows(trials: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Trials as CSV rows: nested fields become dotted columns (``params.koopman_dim``,
    ``values.val_ppl``), parameters in the README's order."""
    rows = []
    for t in trials:
        row: dict[str, Any] = {}
        _flatten("", t, row)
        rows.append(row)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    # a nested field that is missing in one row (``values`` of a pruned trial) has its own dotted columns:
    # its bare name would be one more column, empty in every row
    columns = [c for c in columns if not any(other.startswith(f"{c}.") for other in columns)]
    params = [f"params.{p}" for p in param_order(c[len("params.") :] for c in columns if c.startswith("params."))]
    rest = [c for c in columns if not c.startswith("params.")]
    at = rest.index("label") + 1 if "label" in rest else len(rest)
    return rest[:at] + params + rest[at:], rows


def dump(data: Any, fmt: str, trials: Sequence[Mapping[str, Any]] = ()) -> str:
    """``data`` as json or yaml, or ``trials`` as csv (one row per trial, a header line first)."""
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "yaml":
        import yaml  # a dependency of optuna

        return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).rstrip("\n")
    if fmt == "csv":
        columns, rows = flat_rows(trials)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: ("" if r.get(c) is None else csv_cell(r.get(c))) for c in columns} for r in rows)
        return buf.getvalue().rstrip("\n")
    raise ValueError(f"format must be one of {', '.join(DATA_FORMATS)}, but got format={fmt!r}")
