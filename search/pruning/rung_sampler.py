"""TPE that learns from the rungs pruned trials reached (``sampler = "tpe-rungs"``, docs/asha.md "What the
samplers learn from a pruned trial").

Plain TPE sees a trial stopped at a rung as "pruned", no more. This sampler shows TPE a view of the study in
which every trial that reached one chosen fidelity carries its values *there*, the way BOHB and MOBSTER fit
their model: the fidelity is the highest one that at least ``min_points`` trials reached, from the end of
training down through the asha rungs (Koopman epochs 1, η, η², ...). Trials that stopped below it stay
"pruned" in the view. Values at a rung are the ones asha ranks on (:func:`search.pruning.asha.rung_values`:
perplexities over the baseline's at that epoch), so trials that switched their Koopman loss on at different
epochs compare at the same Koopman epoch.

Nothing is stored: the view lives inside the sampler's call, so no trial gets values it did not finish with and
the Pareto front holds complete trials only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from koopman_search.search.pruning.asha import BASELINE_RELATIVE, rung_values
from koopman_search.search.storage import layout
from koopman_search.search.storage.optuna_private import study_with_trials
from koopman_search.search.studyfile.prune_settings import AshaSettings

__all__ = ["FINAL", "RungTPESampler", "choose_level", "rung_view"]

FINAL = -1
"""The level of a trial that trained to its last epoch (its Koopman epochs counted from its own start)."""

Levels = Mapping[int, tuple[float, ...]]  # level (a Koopman epoch, or FINAL) -> values there, minimise-signed


def choose_level(levels: Iterable[Levels], min_points: int) -> int | None:
    """The highest fidelity that ``min_points`` trials reached: FINAL, else the largest Koopman epoch; None
    when no level has that many (the view is then the study as it is)."""
    counts: dict[int, int] = {}
    for trial_levels in levels:
        for level in trial_levels:
            counts[level] = counts.get(level, 0) + 1
    if counts.get(FINAL, 0) >= min_points:
        return FINAL
    reached = [k for k, n in counts.items() if k != FINAL and n >= min_points]
    return max(reached) if reached else None


def rung_view(
    trials: Sequence[FrozenTrial],
    levels_of: Callable[[FrozenTrial], Levels],
    signs: Sequence[float],
    min_points: int,
) -> tuple[int | None, list[FrozenTrial]]:
    """(the chosen level, the trials as the sampler sees them): a finished trial that reached the level is a
    COMPLETE copy with its values there (signs undone, so the copy's values read as the study's directions);
    one that did not is a PRUNED copy. Running trials are left as they are."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    levels = {t.number: levels_of(t) for t in finished}
    level = choose_level(levels.values(), min_points)
    if level is None:
        return None, list(trials)
    out = []
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            out.append(t)
            continue
        seen = copy.copy(t)
        values = levels[t.number].get(level)
        if values is not None and all(math.isfinite(v) for v in values):
            seen.state = TrialState.COMPLETE
            seen.values = [s * v for s, v in zip(signs, values, strict=True)]
        else:
            seen.state = TrialState.PRUNED
            seen.values = None
        out.append(seen)
    return level, out


class RungTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE fitted on the study's highest well-populated fidelity (see the module docstring).

    ``metrics``/``directions``: the study's objectives; ``epochs``: a trial's epochs; ``default_start``: the
    Koopman start epoch of a trial that does not sample it; ``baseline_attr``: the study attr holding the
    matched baseline (its val_ppl curve scales perplexities as asha does); ``min_points``: the trials a
    fidelity needs before the model is fitted there (BOHB's rule: the number of parameters plus two)."""

    def __init__(
        self,
        asha: AshaSettings,
        metrics: Sequence[str],
        directions: Sequence[str],
        epochs: int,
        default_start: int,
        baseline_attr: str,
        min_points: int,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        self._asha = asha
        self._metrics = tuple(metrics)
        self._signs = tuple(-1.0 if d == "maximize" else 1.0 for d in directions)
        self._epochs = epochs
        self._default_start = default_start
        self._baseline_attr = baseline_attr
        self._min_points = min_points
        self._baseline: tuple[tuple[float, ...], dict[str, tuple[float, ...]]] | None = None

    def _read_baseline(self, study: optuna.Study) -> tuple[tuple[float, ...], dict[str, tuple[float, ...]]]:
        if self._baseline is not None:
            return self._baseline
        attr = layout.study_attrs(study).get(self._baseline_attr) or {}
        val_ppl = tuple(math.nan if v is None else float(v) for v in attr.get("val_ppl") or ())
        columns = attr.get("records") or {}
        curves = {
            m: tuple(math.nan if v is None else float(v) for v in columns.get(m) or ())
            for m in self._metrics
            if m in BASELINE_RELATIVE
        }
        if val_ppl and attr.get("state") in ("complete", "fixed"):
            self._baseline = (val_ppl, curves)  # a finished baseline never changes: read it once
        return val_ppl, curves

    def _levels_of(self, study: optuna.Study) -> Callable[[FrozenTrial], Levels]:
        val_ppl, curves = self._read_baseline(study)

        def levels(trial: FrozenTrial) -> Levels:
            start = int(trial.params.get("koopman_start_epoch", self._default_start))
            columns = layout.trial_attrs(trial).get(layout.RECORDS)
            out: dict[int, tuple[float, ...]] = {}
            for k in self._asha.rungs(self._epochs - start):
                values = rung_values(columns, start + k, self._metrics, self._signs, val_ppl, curves)
                if values is not None:
                    out[k] = values
            if trial.state == TrialState.COMPLETE:
                final = rung_values(columns, self._epochs, self._metrics, self._signs, val_ppl, curves)
                if final is not None:
                    out[FINAL] = final
            return out

        return levels

    def _view(self, study: optuna.Study) -> Any:
        trials = study.get_trials(deepcopy=False)
        _, seen = rung_view(trials, self._levels_of(study), self._signs, self._min_points)
        return study_with_trials(study, seen)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        return super().sample_relative(self._view(study), trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return super().sample_independent(self._view(study), trial, param_name, param_distribution)
