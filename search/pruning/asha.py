"""Asynchronous successive halving for one objective or several: ``pruner = "asha"`` (docs/asha.md).

Rungs are counted in **Koopman epochs**, the epochs a trial trains after its start epoch s (with shared
warmup, epochs 1..s come from the baseline's checkpoint, so these are the epochs a trial pays for). A trial
reaches rung j after ``asha_min_epochs · η^j`` Koopman epochs, i.e. at epoch ``s + min · η^j``, as long as
that is before its last epoch. There it continues only if it is among the top ``max(1, n // η)`` of the n
trials that have a record at the same rung, itself included (the first trials of a rung are kept, as in
Optuna's successive halving: no worker ever waits for a rung to fill).

A rung's values are the study's objectives at that epoch, perplexities (fields ending in ``_ppl``) divided
by the Koopman-off baseline's val perplexity at the same epoch: trials that start at different epochs have
had different amounts of LM training when they reach one rung, and the ratio takes that out. The head-free
linearity measure (``val_linear_nre``), which the baseline has too, is divided by the baseline's own value at
that epoch for the same reason. For several
objectives "top" is the order of non-dominated sorting, ties within a front broken by crowding distance
(NSGA-II's), so that a front's extremes go first; equal points share a place.

This module holds the decision on plain numbers (its settings, :class:`AshaSettings`, are the study file's:
search/studyfile/prune_settings.py); :class:`koopman_search.search.pruning.rungs.AshaPruner` reads a
rung from the storage and decides with them.

    decide((1.2, 1.4), [(1.1, 1.6), (1.3, 1.3), (1.5, 1.5)], reduction_factor=3)
    # RungDecision(rank=3, of=4, keep=1): on the first front, but between its two extremes, which go first
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BASELINE_RELATIVE",
    "PRUNED_BY",
    "RungDecision",
    "decide",
    "order_keys",
    "rung_values",
]

PRUNED_BY = "asha"


# ---- the decision, on plain numbers ------------------------------------------------------------------------


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def _crowding(points: list[tuple[float, ...]]) -> list[float]:
    """NSGA-II's crowding distance of distinct points of one front (extremes infinite)."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    distance = [0.0] * n
    for m in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][m])
        low, high = points[order[0]][m], points[order[-1]][m]
        distance[order[0]] = distance[order[-1]] = math.inf
        if not (math.isfinite(low) and math.isfinite(high)) or high == low:
            continue
        for a, i, b in zip(order, order[1:], order[2:], strict=False):
            distance[i] += (points[b][m] - points[a][m]) / (high - low)
    return distance


def order_keys(points: Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    """A sort key per point, all minimised: (non-dominated front, −crowding distance). Equal points get
    equal keys. A point with a NaN counts as +∞ in every objective (behind every point without one)."""
    clean = [tuple(math.inf for _ in p) if any(math.isnan(v) for v in p) else tuple(p) for p in points]
    distinct = list(dict.fromkeys(clean))
    front = [-1] * len(distinct)
    remaining, level = set(range(len(distinct))), 0
    while remaining:
        current = {i for i in remaining if not any(_dominates(distinct[j], distinct[i]) for j in remaining if j != i)}
        for i in current:
            front[i] = level
        remaining -= current
        level += 1
    keys: dict[tuple[float, ...], tuple[int, float]] = {}
    for level in range(max(front, default=-1) + 1):
        members = [i for i in range(len(distinct)) if front[i] == level]
        for i, d in zip(members, _crowding([distinct[i] for i in members]), strict=True):
            keys[distinct[i]] = (level, -d)
    return [keys[p] for p in clean]


@dataclass(frozen=True)
class RungDecision:
    rank: int  # 1 + the number of trials strictly ahead of this one
    of: int  # trials with a record at this rung, this one included
    keep: int  # how many continue: max(1, of // η), or all of them while fewer than min_trials are there

    @property
    def kept(self) -> bool:
        return self.rank <= self.keep


def decide(
    mine: Sequence[float], others: Sequence[Sequence[float]], reduction_factor: int, min_trials: int = 1
) -> RungDecision:
    """Where ``mine`` stands among ``others`` (values already signed so that lower is better).

    The rung keeps its top ``max(1, n // η)`` of the n trials there; while fewer than ``min_trials`` trials
    are there it keeps them all (too few to rank). The ends of the first front are never pruned by a rung:
    their crowding distance is infinite, so they share the first place (docs/asha.md, "The decision")."""
    keys = order_keys([mine, *others])
    ahead = sum(1 for k in keys[1:] if k < keys[0])
    n = len(keys)
    keep = n if n < min_trials else max(1, n // reduction_factor)
    return RungDecision(rank=ahead + 1, of=n, keep=keep)


# Objectives the Koopman-off baseline has a value of at every epoch (trainer/linearity.py): read at a rung
# against the baseline's own value at the same epoch.
BASELINE_RELATIVE = frozenset({"val_linear_nre"})


# ---- reading a rung from the storage -----------------------------------------------------------------------


def rung_values(
    columns: Mapping[str, Sequence[Any]] | None,
    epoch: int,
    metrics: Sequence[str],
    signs: Sequence[float],
    baseline_val_ppl: Sequence[float],
    baseline_curves: Mapping[str, Sequence[float]] | None = None,
) -> tuple[float, ...] | None:
    """A trial's values at ``epoch`` from its stored record columns (None when it has no record there):
    each metric times its sign (−1 for maximised), perplexities divided by the baseline's val_ppl there, and a
    metric the baseline has itself (``BASELINE_RELATIVE``, its curve in ``baseline_curves``) by the baseline's
    own value there."""
    if not columns or epoch not in (columns.get("epoch") or []):
        return None
    i = list(columns["epoch"]).index(epoch)
    out = []
    for metric, sign in zip(metrics, signs, strict=True):
        column = columns.get(metric) or []
        value = column[i] if i < len(column) else None
        value = math.nan if value is None else float(value)
        if metric.endswith("_ppl") and 1 <= epoch <= len(baseline_val_ppl):
            value /= baseline_val_ppl[epoch - 1]
        elif metric in BASELINE_RELATIVE:
            curve = (baseline_curves or {}).get(metric) or ()
            own = curve[epoch - 1] if 1 <= epoch <= len(curve) else None
            if own is not None and math.isfinite(own) and own > 0:
                value /= own
        out.append(sign * value)
    return tuple(out)
