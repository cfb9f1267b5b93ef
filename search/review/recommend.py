"""The study's answer in the form the researcher wrote their hand-tuning report: what the baseline did, what
went wrong, three options with their settings, effects and arithmetic, and the success and retune indicators
checked against the records (``koopman-search recommend``).

Everything here is read from what the search stored (the same values ``status`` and ``best`` show, through
:func:`search.review.status.status_data` and :func:`search.review.stored.trial_facts`); nothing is re-run.
The analysis (:func:`recommendation`) is separate from the words (:mod:`search.review.recommend_text`), so
the English and the Japanese report hold the same numbers, formatted once by :func:`search.review.summary.fmt`.

The options come from the Pareto front (docs/design.md, "The answer"):

* conservative: the front's best first objective (val_ppl in the shipped studies: the least cost to the LM);
* aggressive: the front's best second objective (the most linear blocks);
* balanced: the front's knee, the trial nearest the ideal point once each objective is scaled to 0..1 over
  the front (Das 1999, the normal-boundary "knee"): of the trials left, the best trade between the two.

A one-objective study has one option, its best trial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from koopman_search.search.errors import StudyNotFoundError
from koopman_search.search.review.reach import RuleReach, rules_reach
from koopman_search.search.review.status import status_data
from koopman_search.search.review.stored import (
    StoredBaseline,
    TrialFacts,
    objective_directions,
    read_baseline,
    read_rules,
    trial_facts,
)
from koopman_search.search.review.summary import best_trials
from koopman_search.search.storage import layout

__all__ = [
    "SUCCESS_TOTAL_LOSS",
    "Check",
    "Option",
    "Problem",
    "Recommendation",
    "recommendation",
]

# The user's own success mark: "total loss < 6.5" (retune above the rule's 7.0); their other marks are the
# study's rules (the ratio limit) and these tolerances.
SUCCESS_TOTAL_LOSS = 6.5
LM_STABLE_TOLERANCE = 0.02  # "LM loss stable": within 2% of the matched baseline's at every Koopman epoch
MAX_WARNINGS_PER_EPOCH = 1  # "at most one warning per epoch": the fallback's cut batches
K_GROWTH = 2.0  # ‖K‖₂ more than doubled over the Koopman epochs, and above this value: K amplifies
COLLAPSE_RATIO = 0.8  # phi_rank_ratio below this: φ less spread than the states (0.51-0.76 without the spread term)
SHRINK = 0.1  # φ's scale fell below a tenth of its first Koopman epoch's


@dataclass(frozen=True)
class Check:
    """One indicator for one option: passed (None = the records cannot tell), the value and where."""

    key: str  # success_total | retune_total | ppl_ratio | lm_stable | koopman_falling | warnings
    passed: bool | None
    value: float | None = None
    limit: float | None = None
    epoch: int | None = None


@dataclass(frozen=True)
class Option:
    kind: str  # conservative | balanced | aggressive
    trial: TrialFacts
    values: dict[str, float | None]  # the objectives, as status shows them
    baseline: dict[str, float | None]  # the same metrics of the baseline at the trial's last epoch
    checks: list[Check] = field(default_factory=list)

    @property
    def last(self) -> dict[str, float | None]:
        """The last epoch's record, by column."""
        return {name: (values[-1] if values else None) for name, values in (self.trial.columns or {}).items()}


@dataclass(frozen=True)
class Problem:
    key: str  # rule | tradeoff | fallback_idle | k_growth | collapse | shrink | failed
    values: dict[str, Any]


@dataclass(frozen=True)
class Recommendation:
    study: str
    objectives: list[str]
    directions: list[str]
    totals: dict[str, Any]
    baseline: StoredBaseline | None
    options: list[Option]
    problems: list[Problem]
    front_size: int
    rules: dict[str, RuleReach]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pick(front: Sequence[TrialFacts], directions: Sequence[str]) -> list[tuple[str, TrialFacts]]:
    """(kind, trial) for the three options; one for a one-objective study. ``front`` is ordered by the first
    objective, best first."""
    if len(directions) < 2 or len(front) == 1:
        return [("conservative", front[0])]
    signs = [1.0 if d == "minimize" else -1.0 for d in directions[:2]]
    points = [(signs[0] * (t.values or (0, 0))[0], signs[1] * (t.values or (0, 0))[1]) for t in front]
    aggressive = front[min(range(len(front)), key=lambda i: (points[i][1], points[i][0]))]
    spans = [max(p[i] for p in points) - min(p[i] for p in points) or 1.0 for i in (0, 1)]
    lows = [min(p[i] for p in points) for i in (0, 1)]
    taken = {front[0].number, aggressive.number}
    left = [i for i, t in enumerate(front) if t.number not in taken] or list(range(len(front)))
    knee = min(left, key=lambda i: math.hypot(*((points[i][j] - lows[j]) / spans[j] for j in (0, 1))))
    return [("conservative", front[0]), ("balanced", front[knee]), ("aggressive", aggressive)]


def _koopman_rows(trial: TrialFacts) -> list[dict[str, Any]]:
    """The trial's epochs with the Koopman loss on (scheduled weight > 0), as records."""
    cols = trial.columns or {}
    names = list(cols)
    rows = [dict(zip(names, values, strict=True)) for values in zip(*(cols[n] for n in names), strict=True)]
    return [r for r in rows if _finite(r.get("koopman_weight")) and r["koopman_weight"] > 0]


def _worst(pairs: Sequence[tuple[int, Any]]) -> tuple[float, int] | None:
    """(highest value, its epoch) of (epoch, value) pairs, NaN and missing left out; None if none is left."""
    finite = [(float(v), e) for e, v in pairs if _finite(v)]
    return max(finite, key=lambda p: (p[0], -p[1])) if finite else None


def _at_most(key: str, pairs: Sequence[tuple[int, Any]], limit: float, strict: bool = False) -> Check:
    """Passed when the highest of ``pairs`` stays at or under ``limit`` (under it, with ``strict``)."""
    worst = _worst(pairs)
    if worst is None:
        return Check(key, None, limit=limit)
    value, epoch = worst
    return Check(key, value < limit if strict else value <= limit, value, limit, epoch)


def _checks(trial: TrialFacts, baseline: StoredBaseline | None, ratio_max: float, total_max: float) -> list[Check]:
    """The user's success and retune indicators, from the trial's records (epochs with the Koopman loss on,
    except the ratio, judged at every epoch as the rule is)."""
    rows = _koopman_rows(trial)
    last_total = [(trial.last_epoch or 0, (trial.metric("total_loss") or [None])[-1])]
    base = baseline.columns or {} if baseline is not None else {}
    base_lm = base.get("lm_loss") or []
    ratios = []
    for e, v in zip(trial.epoch_numbers, trial.metric("val_ppl"), strict=False):
        b = baseline.at(e) if baseline is not None else None
        if _finite(v) and _finite(b) and b:
            ratios.append((e, float(v) / float(b)))  # type: ignore[arg-type]
    lm_rise = [
        (r["epoch"], r["lm_loss"] / base_lm[r["epoch"] - 1] - 1.0)
        for r in rows
        if r["epoch"] <= len(base_lm) and _finite(r.get("lm_loss")) and _finite(base_lm[r["epoch"] - 1])
    ]
    koopman = [r for r in rows if _finite(r.get("koopman_loss"))]
    falling = Check("koopman_falling", None)
    if len(koopman) >= 2:
        first, end = koopman[0], koopman[-1]
        falling = Check(
            "koopman_falling",
            end["koopman_loss"] < first["koopman_loss"],
            end["koopman_loss"],
            first["koopman_loss"],
            first["epoch"],
        )
    return [
        _at_most("success_total", last_total, SUCCESS_TOTAL_LOSS, strict=True),
        _at_most("retune_total", [(r["epoch"], r.get("total_loss")) for r in rows], total_max),
        _at_most("ppl_ratio", ratios, ratio_max, strict=True),
        _at_most("lm_stable", lm_rise, LM_STABLE_TOLERANCE),
        falling,
        _at_most("warnings", [(r["epoch"], r.get("fallback_batches")) for r in rows], MAX_WARNINGS_PER_EPOCH),
    ]


def _k_growth(trials: Sequence[TrialFacts]) -> Problem | None:
    """Trials whose ‖K‖₂ more than doubled over their Koopman epochs to above K_GROWTH: K amplifies."""
    grown = []
    for t in trials:
        norms = [(r["epoch"], r["koopman_k_norm"]) for r in _koopman_rows(t) if _finite(r.get("koopman_k_norm"))]
        if len(norms) >= 2 and norms[-1][1] > K_GROWTH * norms[0][1] and norms[-1][1] > K_GROWTH:
            grown.append((norms[-1][1] / norms[0][1], t.number, norms[0][1], norms[-1][1], norms[-1][0]))
    if not grown:
        return None
    factor, number, first, last, epoch = max(grown)
    return Problem(
        "k_growth",
        {"count": len(grown), "trial": number, "first": first, "last": last, "epoch": epoch, "factor": factor},
    )


def _collapse(trials: Sequence[TrialFacts]) -> list[Problem]:
    """φ less spread than the states at a trial's last Koopman epoch, or φ shrunk over its Koopman epochs."""
    low, shrunk = [], []
    for t in trials:
        rows = _koopman_rows(t)
        ratios = [(r["epoch"], r["phi_rank_ratio"]) for r in rows if _finite(r.get("phi_rank_ratio"))]
        if ratios and ratios[-1][1] < COLLAPSE_RATIO:
            low.append((ratios[-1][1], t.number, ratios[-1][0]))
        scales = [(r["epoch"], r["phi_scale"]) for r in rows if _finite(r.get("phi_scale"))]
        if len(scales) >= 2 and scales[-1][1] < SHRINK * scales[0][1]:
            shrunk.append((scales[-1][1] / scales[0][1], t.number, scales[0][1], scales[-1][1]))
    out = []
    if low:
        value, number, epoch = min(low)
        out.append(
            Problem(
                "collapse",
                {"count": len(low), "value": value, "trial": number, "epoch": epoch, "limit": COLLAPSE_RATIO},
            )
        )
    if shrunk:
        _, number, first, last = min(shrunk)
        out.append(Problem("shrink", {"count": len(shrunk), "trial": number, "first": first, "last": last}))
    return out


def _problems(trials: Sequence[TrialFacts], reach: dict[str, RuleReach], front: Sequence[TrialFacts]) -> list[Problem]:
    out = [Problem("rule", {"reach": r}) for r in reach.values()]
    weights = {t.params.get("koopman_weight_max") for t in front} - {None}
    if len(front) >= 1 and len(weights) == 1:
        out.append(Problem("tradeoff", {"weight": next(iter(weights))}))
    ran = [t for t in trials if _koopman_rows(t)]
    cuts = sum(int(r.get("fallback_batches") or 0) for t in ran for r in _koopman_rows(t))
    if ran and cuts == 0 and any("fallback_threshold" in t.params for t in ran):
        out.append(Problem("fallback_idle", {"trials": len(ran)}))
    grown = _k_growth(trials)
    if grown is not None:
        out.append(grown)
    out += _collapse(trials)
    failed = [t for t in trials if t.state == "FAIL"]
    if failed:
        out.append(
            Problem("failed", {"count": len(failed), "trial": failed[0].number, "reason": failed[0].fail_reason or ""})
        )
    return out


def recommendation(study: optuna.Study) -> Recommendation:
    """The study's answer: three options from its front (one for one objective), the problems found and the
    user's indicators. Raises :class:`StudyNotFoundError` when no trial is complete yet."""
    front = best_trials(study)
    if not front:
        raise StudyNotFoundError(f"study {study.study_name} has no complete trial yet; nothing to recommend")
    data = status_data(study)
    by_number = {t["number"]: t for t in data["trials"]}
    attrs = layout.study_attrs(study)
    baseline = read_baseline(attrs)
    rules = read_rules(attrs)
    trials = [trial_facts(t) for t in study.get_trials(deepcopy=False)]
    reach = rules_reach(trials, rules, baseline)
    names: list[str] = data["objectives"]
    options = []
    for kind, trial in _pick(front, objective_directions(study)):
        last = trial.last_epoch or 0
        base_cols = (baseline.columns or {}) if baseline is not None else {}
        base_at = {n: (base_cols.get(n) or [None] * last)[last - 1] if last else None for n in names}
        checks = _checks(trial, baseline, rules.val_ppl_ratio_max or 1.3, rules.total_loss_max or 7.0)
        options.append(Option(kind, trial, dict(by_number[trial.number]["values"] or {}), base_at, checks))
    return Recommendation(
        study=study.study_name,
        objectives=names,
        directions=objective_directions(study),
        totals=data["totals"],
        baseline=baseline,
        options=options,
        problems=_problems(trials, reach, front),
        front_size=len(front),
        rules=reach,
    )
