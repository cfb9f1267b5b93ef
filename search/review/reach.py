"""How close the study's prune rules came to firing, and whether the Koopman weight bought linearity.

A rule that never fires says nothing by its silence: was every trial far inside it, or one a hair below? For
each rule this finds the closest value any trial reached on an epoch the rule judges, with its trial and
epoch, and says it in words:

    total_loss_max 7.0: no trial came within 0.7% (closest total_loss 6.951, trial 3, epoch 5)
    val_ppl_ratio_max 1.3: broken by 2 trials (highest ratio 1.42, trial 6, epoch 4)

The epochs judged are the rules' own (search/pruning/rules.py): the total-loss rule only where the Koopman loss is on
and the baseline itself is not over the limit; the ratio rule at every epoch with a baseline value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from koopman_search.search.pruning.rules import unjudged_epochs
from koopman_search.search.review.stored import StoredBaseline, StoredRules, TrialFacts
from koopman_search.search.review.summary import fmt

__all__ = ["RuleReach", "against_baseline_text", "findings", "noise_text", "rules_reach", "weight_bought_text"]

# Below this, φ is less spread than the states it encodes: collapsed (README, "What the words mean").
PHI_COLLAPSED_BELOW = 0.8


@dataclass(frozen=True)
class RuleReach:
    """One rule: its limit, the highest judged value any trial reached (``closest``), and how many broke it."""

    rule: str  # "total_loss_max" | "val_ppl_ratio_max"
    metric: str  # what is compared with the limit: "total_loss" | "val_ppl_ratio"
    limit: float
    closest: float | None = None
    trial: int | None = None
    epoch: int | None = None
    broken_by: int = 0  # trials with at least one judged epoch over the limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "metric": self.metric,
            "closest": None
            if self.closest is None
            else {"value": self.closest, "trial": self.trial, "epoch": self.epoch},
            "fired": self.broken_by > 0,
            "broken_by": self.broken_by,
            "text": self.text(),
        }

    def text(self) -> str:
        head = f"{self.rule} {fmt(self.limit)}"
        if self.closest is None:
            return f"{head}: no trial has a judged epoch yet"
        where = f"trial {self.trial}, epoch {self.epoch}"
        if self.broken_by:
            plural = "s" if self.broken_by != 1 else ""
            return (
                f"{head}: broken by {self.broken_by} trial{plural} (highest {self.metric} {fmt(self.closest)}, {where})"
            )
        gap = (self.limit - self.closest) / self.limit * 100
        if gap == 0:
            return f"{head}: reached exactly, not broken ({self.metric} {fmt(self.closest)}, {where})"
        return f"{head}: no trial came within {gap:.2g}% (closest {self.metric} {fmt(self.closest)}, {where})"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _judged(
    trials: Sequence[TrialFacts],
    values: Callable[[TrialFacts], list[tuple[int, float]]],
    limit: float,
    rule: str,
    metric: str,
) -> RuleReach:
    best: tuple[float, int, int] | None = None
    broken = 0
    for t in trials:
        over = False
        for epoch, value in values(t):
            if best is None or value > best[0]:
                best = (value, t.number, epoch)
            over = over or value > limit
        broken += over
    if best is None:
        return RuleReach(rule, metric, limit)
    return RuleReach(rule, metric, limit, best[0], best[1], best[2], broken)


def _total_losses(trial: TrialFacts, unjudged: set[int]) -> list[tuple[int, float]]:
    """(epoch, total_loss) of the epochs the total-loss rule judges: Koopman loss on, baseline not over."""
    rows = zip(trial.epoch_numbers, trial.metric("koopman_weight"), trial.metric("total_loss"), strict=False)
    out = []
    for epoch, weight, value in rows:
        if _finite(weight) and float(weight or 0.0) > 0 and epoch not in unjudged and _finite(value):
            out.append((epoch, float(value or 0.0)))
    return out


def _ppl_ratios(trial: TrialFacts, baseline: StoredBaseline) -> list[tuple[int, float]]:
    """(epoch, val_ppl ÷ the baseline's at that epoch) of every epoch with both."""
    pairs = []
    for e, v in zip(trial.epoch_numbers, trial.metric("val_ppl"), strict=False):
        b = baseline.at(e)
        if v is not None and b is not None and _finite(v) and _finite(b) and b > 0:
            pairs.append((e, float(v) / b))
    return pairs


def rules_reach(
    trials: Sequence[TrialFacts], rules: StoredRules, baseline: StoredBaseline | None
) -> dict[str, RuleReach]:
    """The closest approach to each of the study's rules (a rule the study does not set is left out)."""
    out: dict[str, RuleReach] = {}
    if rules.total_loss_max is not None:
        total_max = rules.total_loss_max
        base_total = ((baseline.columns or {}).get("total_loss") or []) if baseline is not None else []
        unjudged = set(unjudged_epochs(total_max, base_total))
        out["total_loss_max"] = _judged(
            trials, lambda t: _total_losses(t, unjudged), total_max, "total_loss_max", "total_loss"
        )
    if rules.val_ppl_ratio_max is not None and baseline is not None:
        known = baseline
        out["val_ppl_ratio_max"] = _judged(
            trials, lambda t: _ppl_ratios(t, known), rules.val_ppl_ratio_max, "val_ppl_ratio_max", "val_ppl_ratio"
        )
    return out


def weight_bought_text(front: Sequence[TrialFacts], linearity_metric: str | None) -> str | None:
    """A sentence when the front cannot show a trade-off: all its trials share one Koopman weight (or there is
    one), so the study found no weight that buys linearity at a cost in perplexity. None otherwise."""
    weights = {t.params.get("koopman_weight_max") for t in front if t.params.get("koopman_weight_max") is not None}
    if not front or len(weights) > 1:
        return None
    what = linearity_metric or "the linearity objective"
    weight = f" (koopman_weight_max {fmt(next(iter(weights)))})" if weights else ""
    return (
        f"the Pareto front holds one Koopman weight{weight}: in this study a larger weight bought no {what} "
        "worth its cost in val_ppl"
    )


def _last_finite(values: Sequence[float | None]) -> float | None:
    last = values[-1] if values else None
    return float(last) if last is not None and _finite(last) else None


def noise_text(trials: Sequence[TrialFacts]) -> str | None:
    """How far the complete trials' final val_ppl differ, against what the validation set can tell apart:
    twice the median standard error of their final val_loss over the validation batches (``val_loss_se``,
    which is val_ppl's relative standard error). None under two complete trials, or when no trial stored it
    (a study from before it was recorded)."""
    finals: list[tuple[float, float | None]] = []
    for t in trials:
        if t.state != "COMPLETE":
            continue
        ppl = _last_finite(t.metric("val_ppl"))
        if ppl is not None:
            finals.append((ppl, _last_finite(t.metric("val_loss_se"))))
    errors = sorted(se for _, se in finals if se is not None)
    if len(finals) < 2 or not errors:
        return None
    resolution = 2 * errors[len(errors) // 2]  # two standard errors, relative
    values = sorted(ppl for ppl, _ in finals)
    best, worst = values[0], values[-1]
    level = sum(1 for v in values[1:] if v / best - 1 <= resolution)
    spread = (worst / best - 1) * 100
    others = "none of the others is" if level == 0 else f"{level} of the others {'is' if level == 1 else 'are'}"
    return (
        f"val_ppl of the {len(values)} complete trials spans {fmt(best)}–{fmt(worst)} ({spread:.2g}% apart); the "
        f"validation set tells apart differences over {resolution * 100:.2g}% (two standard errors over its "
        f"batches), so {others} level with the best; seed-to-seed noise is not measured (every trial trains "
        "with one seed)"
    )


def _at_epoch(columns: Any, metric: str, epoch: int) -> float | None:
    """A stored record column's value at ``epoch``, or None."""
    if not columns or epoch not in (columns.get("epoch") or []):
        return None
    values = columns.get(metric) or []
    i = list(columns["epoch"]).index(epoch)
    value = values[i] if i < len(values) else None
    return float(value) if value is not None and _finite(value) else None


def against_baseline_text(
    front: Sequence[TrialFacts], baseline: StoredBaseline | None, metrics: Sequence[str]
) -> str | None:
    """The front's trials at their last epoch against the Koopman-off baseline at the same epoch, for each
    objective but val_ppl that the baseline has too (val_linear_nre), and φ's spread against the states' own
    (``phi_rank_ratio``). None when there is nothing to compare."""
    parts = []
    for metric in (m for m in metrics if m != "val_ppl"):
        ratios = []
        for t in front:
            if baseline is None or not t.epoch_numbers:
                continue
            mine = _at_epoch(t.columns, metric, t.epoch_numbers[-1])
            base = _at_epoch(baseline.columns, metric, t.epoch_numbers[-1])
            if mine is not None and base:
                ratios.append(mine / base)
        if ratios:
            lo, hi = min(ratios), max(ratios)
            span = f"{fmt(lo)}×" if lo == hi else f"{fmt(lo)}–{fmt(hi)}×"
            parts.append(f"{metric} {span} the baseline's at the same epoch")
    ranks = [r for r in (_last_finite(t.metric("phi_rank_ratio")) for t in front) if r is not None]
    if ranks:
        lo, hi = min(ranks), max(ranks)
        span = fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"
        collapsed = sum(1 for r in ranks if r < PHI_COLLAPSED_BELOW)
        parts.append(
            f"φ's effective rank {span} of the states' own (phi_rank_ratio; {collapsed} of {len(ranks)} under "
            f"{PHI_COLLAPSED_BELOW}, collapsed)"
        )
    if not parts:
        return None
    who = "the best trial" if len(front) == 1 else f"the front's {len(front)} trials"
    return f"{who} at the last epoch: " + "; ".join(parts)


def findings(
    trials: Sequence[TrialFacts],
    rules: StoredRules,
    baseline: StoredBaseline | None,
    best: Sequence[TrialFacts],
    names: Sequence[str],
) -> list[str]:
    """The sentences every review shows under the study's summary: each rule's reach, then (for a Pareto
    study) whether the front shows the weight buying anything, how far the trials differ against noise, and the
    front's Koopman metrics against the baseline."""
    lines = [reach.text() for reach in rules_reach(trials, rules, baseline).values()]
    noise = noise_text(trials)
    if noise:
        lines.append(noise)
    koopman = against_baseline_text(best, baseline, names)
    if koopman:
        lines.append(koopman)
    if len(names) >= 2:
        bought = weight_bought_text(best, names[1])
        if bought:
            lines.append(bought)
    return lines
