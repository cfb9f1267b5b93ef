"""The study's state as plain data: every trial, its retries, the baseline and the totals.

A query over what the search stored; ``koopman-search status`` prints it as a table or as JSON, and
``launch`` prints it when its trials are done.
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from koopman_search.search.pruning.rules import unjudged_epochs
from koopman_search.search.review.reach import against_baseline_text, noise_text, rules_reach, weight_bought_text
from koopman_search.search.review.stored import objective_names, read_baseline, read_rules, trial_facts
from koopman_search.search.review.summary import best_trials, summarize
from koopman_search.search.storage import layout

__all__ = ["SHOWN_METRICS", "status_data"]

SHOWN_METRICS = (
    "total_loss",
    "val_ppl",
    "val_linear_nre",
    "val_koopman_forward_ppl",
    "val_koopman_nre",
    "phi_rank_ratio",
)


def _num(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _unjudged(user_attrs: Any, baseline: Any) -> list[int]:
    limit = read_rules(user_attrs).total_loss_max
    total = (baseline.columns or {}).get("total_loss") or []
    return unjudged_epochs(limit, total) if limit is not None else []


def status_data(study: optuna.Study) -> dict[str, Any]:
    """The study's trials and totals as plain data (what ``koopman-search status --format json`` prints)."""
    frozen = study.get_trials(deepcopy=False)
    facts = [trial_facts(t) for t in frozen]
    retry_of = {t.number: layout.retry_of(t) for t in frozen if layout.is_retry(t)}
    retried_as = {was: now for now, was in retry_of.items()}
    queued = {t.number: t.system_attrs.get(layout.FIXED_PARAMS) or {} for t in frozen if not t.params}
    attrs = layout.study_attrs(study)
    baseline = read_baseline(attrs)
    summary = summarize(facts, baseline)
    names = objective_names(study)
    reach = rules_reach(facts, read_rules(attrs), baseline)
    front = best_trials(study)
    bought = weight_bought_text(front, names[1]) if len(names) >= 2 else None
    trials = []
    for f in facts:
        last = {m: (f.metric(m)[-1] if f.metric(m) else None) for m in SHOWN_METRICS}
        trials.append(
            {
                "number": f.number,
                "state": f.state,
                "label": f.label,
                # a queued trial's parameters are its fixed ones until it runs (empty: the sampler's choice)
                "params": f.params or dict(queued.get(f.number, {})),
                # keyed by metric name, as in `best` (one shape for a trial in every command)
                "values": dict(zip(names, (_num(v) for v in f.values), strict=False)) if f.values is not None else None,
                "epochs_run": f.epochs_run,
                "epochs_from_warmup": f.epochs_from_warmup,
                "last_epoch": f.last_epoch,
                "final": {k: _num(v) for k, v in last.items()},
                "prune_reason": f.prune_reason,
                "fail_reason": f.fail_reason,
                "retry_of": retry_of.get(f.number),
                "retried_as": retried_as.get(f.number),
            }
        )
    return {
        "study": study.study_name,
        "objectives": names,
        "baseline": {
            "state": baseline.state,
            "val_ppl": list(baseline.val_ppl),
            # epochs the total-loss rule does not judge: the baseline itself is over the limit
            "total_loss_unjudged_epochs": _unjudged(attrs, baseline),
        }
        if baseline
        else None,
        "trials": trials,
        "totals": {
            **{s.lower(): n for s, n in summary.states.items()},
            "epochs_spent": summary.epochs_spent,
            "epochs_by_baseline": summary.baseline_epochs,
            "epochs_saved_by_warmup": summary.epochs_from_warmup,
            "epochs_saved_by_pruning": summary.epochs_saved_by_pruning,
            "epochs_saved_by_rules": summary.epochs_saved_by_rules,
            "epochs_saved_by_pruner": summary.epochs_saved_by_pruner,
            "seconds_spent": round(summary.seconds_spent, 1),
        },
        "summary": f"{summary.states_text()}; {summary.compute_text()}",
        # how close each prune rule came to firing: its limit and the highest judged value any trial reached
        "rules": {name: r.as_dict() for name, r in reach.items()},
        # set when the Pareto front holds a single Koopman weight: the study shows no trade-off
        "tradeoff": bought,
        # the complete trials' val_ppl spread against what the validation set tells apart
        "noise": noise_text(facts),
        # the front's Koopman metrics against the baseline's at the same epoch, and φ's spread
        "against_baseline": against_baseline_text(front, baseline, names),
    }
