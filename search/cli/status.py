"""``koopman-search status``: every trial of a study, and what the study has spent."""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

from search.cli._common import add_study_args, render_table, resolve_target

__all__ = ["add_parser", "run", "status_data", "status_text"]

logger = logging.getLogger(__name__)

EXAMPLE = """examples:
  koopman-search status studies/quickstart.toml
  koopman-search status --study-name wikitext2-koopman --storage postgresql+psycopg://... --format json
"""

SHOWN_METRICS = ("total_loss", "val_ppl", "val_koopman_nre")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "status", help="list a study's trials and totals",
        description="Every trial with state, parameters, epochs run, final metrics and prune reason; then "
                    "the study's totals (complete / pruned / failed, epochs spent and saved).",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, file_required=False)
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    return p


def _num(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def status_data(study: Any) -> dict[str, Any]:
    """The study's trials and totals as plain data (the JSON output)."""
    from search.review.stored import objective_names, read_baseline, trial_facts
    from search.review.summary import summarize

    frozen = study.get_trials(deepcopy=False)
    facts = [trial_facts(t) for t in frozen]
    retry_of = {t.number: t.system_attrs.get("retry_history", [None])[-1] for t in frozen
                if "failed_trial" in t.system_attrs}
    retried_as = {was: now for now, was in retry_of.items()}
    queued = {t.number: t.system_attrs.get("fixed_params") or {} for t in frozen if not t.params}
    baseline = read_baseline(study.user_attrs)
    summary = summarize(facts, baseline)
    trials = []
    for f in facts:
        last = {m: (f.metric(m)[-1] if f.metric(m) else None) for m in SHOWN_METRICS}
        trials.append({
            "number": f.number,
            "state": f.state,
            "label": f.label,
            # a queued trial's parameters are its fixed ones until it runs (empty: the sampler's choice)
            "params": f.params or dict(queued.get(f.number, {})),
            "values": list(f.values) if f.values is not None else None,
            "epochs_run": f.epochs_run,
            "epochs_from_warmup": f.epochs_from_warmup,
            "last_epoch": f.last_epoch,
            "final": {k: _num(v) for k, v in last.items()},
            "prune_reason": f.prune_reason,
            "fail_reason": f.fail_reason,
            "retry_of": retry_of.get(f.number),
            "retried_as": retried_as.get(f.number),
        })
    return {
        "study": study.study_name,
        "objectives": objective_names(study),
        "baseline": {"state": baseline.state, "val_ppl": list(baseline.val_ppl)} if baseline else None,
        "trials": trials,
        "totals": {
            **{s.lower(): n for s, n in summary.states.items()},
            "epochs_spent": summary.epochs_spent,
            "epochs_by_baseline": summary.baseline_epochs,
            "epochs_saved_by_warmup": summary.epochs_from_warmup,
            "epochs_saved_by_pruning": summary.epochs_saved_by_pruning,
            "seconds_spent": round(summary.seconds_spent, 1),
        },
        "summary": f"{summary.states_text()}; {summary.compute_text()}",
    }


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def status_text(data: dict[str, Any]) -> str:
    names = sorted({k for t in data["trials"] for k in t["params"]})
    short = {"koopman_weight_max": "w_max", "koopman_start_epoch": "start", "fallback_threshold": "thresh",
             "schedule": "schedule", "koopman_dim": "dim"}
    headers = ["#", "state", *[short.get(n, n) for n in names], "epochs", *SHOWN_METRICS, "note"]
    rows = []
    for t in data["trials"]:
        epochs = str(t["epochs_run"]) + (f"+{t['epochs_from_warmup']}w" if t["epochs_from_warmup"] else "")
        note = t["prune_reason"] or t["fail_reason"] or t["label"] or ""
        if t["state"] == "FAIL" and not note and t["retried_as"] is not None:
            note = "worker lost (heartbeat stale)"
        if t["retried_as"] is not None:
            note = "; ".join(filter(None, [note, f"retried as #{t['retried_as']}"]))
        if t["retry_of"] is not None:
            note = f"retry of #{t['retry_of']}" + (f"; {note}" if note else "")
        rows.append([str(t["number"]), t["state"], *[_cell(t["params"].get(n)) for n in names], epochs,
                     *[_cell(t["final"][m]) for m in SHOWN_METRICS], note])
    lines = [f"study {data['study']} (objectives: {', '.join(data['objectives'])})", render_table(headers, rows)]
    if data["baseline"]:
        curve = ", ".join(_cell(v) for v in data["baseline"]["val_ppl"])
        lines.append(f"baseline ({data['baseline']['state']}) val PPL per epoch: {curve or '-'}")
    lines.append("epochs: N trained by the trial itself, +Nw taken from the baseline's shared warmup")
    lines.append(data["summary"])
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from search.storage import open_storage
    from search.study import load_study

    target = resolve_target(args)
    study = load_study(open_storage(target.storage_url, heartbeat=False), target.study_name)
    data = status_data(study)
    print(json.dumps(data, indent=2) if args.format == "json" else status_text(data))
    return 0
