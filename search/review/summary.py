"""A finished (or running) study in numbers: trials by state, compute spent and compute saved."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from koopman_search.search.review.stored import StoredBaseline, TrialFacts, trial_facts
from koopman_search.search.text import number

__all__ = [
    "MIN_TRIALS_FOR_IMPORTANCE",
    "StudySummary",
    "best_trials",
    "fmt",
    "fmt_param",
    "fmt_seconds",
    "state_word",
    "summarize",
]

logger = logging.getLogger(__name__)

# fANOVA's importances from fewer complete trials than this are noise (with 8, both objectives of the
# quickstart study got the same ranking): the report shows them from here on, with a caveat, and the study
# note says so under it
MIN_TRIALS_FOR_IMPORTANCE = 10

STATE_ORDER = ("COMPLETE", "PRUNED", "FAIL", "INTERRUPTED", "RUNNING", "WAITING")
_STATE_WORDS = {
    "COMPLETE": "complete",
    "PRUNED": "pruned",
    "FAIL": "failed",
    # a FAIL attempt stopped on purpose (Ctrl-C, SIGTERM) and queued to resume: not a failure of the settings
    "INTERRUPTED": "interrupted (queued to resume)",
    "RUNNING": "running",
    "WAITING": "waiting",
}


def state_word(state: str) -> str:
    return _STATE_WORDS.get(state, state.lower())


def fmt(value: float | int | None) -> str:
    """A number for people (:func:`search.text.number`), ``n/a`` for missing or NaN."""
    return number(value, missing="n/a")


def fmt_param(value: object) -> str:
    """A parameter as a person reads it: floats to 5 significant digits (samplers give 17)."""
    return fmt(value) if isinstance(value, float) else str(value)


def fmt_seconds(seconds: float) -> str:
    """``42 s``, ``12 min 5 s``, ``3 h 20 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


@dataclass(frozen=True)
class StudySummary:
    """Compute of a study in epochs and seconds. Baseline epochs count as spent (it is a real run)."""

    states: dict[str, int]
    trial_epochs: int  # epochs the trials trained themselves
    trial_seconds: float
    baseline_epochs: int
    baseline_seconds: float
    epochs_from_warmup: int  # epochs trials took from the baseline's shared warmup instead of training
    epochs_saved_by_pruning: int  # epochs pruned trials did not train
    epochs_saved_by_rules: int = 0  # of those, by the prune rules
    epochs_saved_by_pruner: int = 0  # of those, by the study's pruner (asha, median, hyperband)

    @property
    def epochs_spent(self) -> int:
        return self.trial_epochs + self.baseline_epochs

    @property
    def seconds_spent(self) -> float:
        return self.trial_seconds + self.baseline_seconds

    @property
    def seconds_per_epoch(self) -> float | None:
        if self.trial_epochs and self.trial_seconds:
            return self.trial_seconds / self.trial_epochs
        if self.baseline_epochs and self.baseline_seconds:
            return self.baseline_seconds / self.baseline_epochs
        return None

    @property
    def epochs_saved(self) -> int:
        return self.epochs_from_warmup + self.epochs_saved_by_pruning

    def states_text(self) -> str:
        """``5 complete, 3 pruned, 1 failed`` (states with no trial left out), or ``no trials``."""
        parts = [f"{n} {state_word(s)}" for s, n in self.states.items() if n]
        return ", ".join(parts) if parts else "no trials"

    def compute_text(self) -> str:
        """One sentence on compute spent and saved, with the saved time estimated from the mean epoch."""
        spent = f"{self.epochs_spent} epochs trained ({fmt_seconds(self.seconds_spent)})"
        if self.baseline_epochs:
            spent += f", {self.baseline_epochs} of them by the baseline"
        saved = (
            f"{self.epochs_from_warmup} epochs saved by the shared warmup, {self.epochs_saved_by_rules} by the "
            f"prune rules and {self.epochs_saved_by_pruner} by the pruner"
        )
        per_epoch = self.seconds_per_epoch
        if per_epoch and self.epochs_saved:
            saved += f" (about {fmt_seconds(per_epoch * self.epochs_saved)})"
        return f"{spent}; {saved}."


def _state(trial: TrialFacts) -> str:
    if trial.state == "FAIL" and (trial.fail_reason or "").startswith("interrupted"):
        return "INTERRUPTED"
    return trial.state


def summarize(trials: Sequence[TrialFacts], baseline: StoredBaseline | None) -> StudySummary:
    counts = Counter(_state(t) for t in trials)
    states = {s: counts.get(s, 0) for s in STATE_ORDER}
    states.update({s: n for s, n in counts.items() if s not in states})
    baseline_epochs = 0
    if baseline is not None and baseline.columns and baseline.columns.get("epoch"):
        baseline_epochs = len(baseline.columns["epoch"])
    return StudySummary(
        states=states,
        trial_epochs=sum(t.epochs_run for t in trials),
        trial_seconds=sum(t.train_seconds for t in trials),
        baseline_epochs=baseline_epochs,
        baseline_seconds=baseline.seconds if baseline is not None else 0.0,
        epochs_from_warmup=sum(t.epochs_from_warmup for t in trials),
        epochs_saved_by_pruning=sum(t.epochs_saved_by_pruning for t in trials),
        epochs_saved_by_rules=sum(t.epochs_saved_by_rules for t in trials),
        epochs_saved_by_pruner=sum(t.epochs_saved_by_pruner for t in trials),
    )


def best_trials(study: optuna.Study) -> list[TrialFacts]:
    """The best trial (one objective) or the Pareto front (several), ordered by the first objective."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    facts = [trial_facts(t) for t in study.best_trials]
    sign = 1.0 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1.0
    return sorted(facts, key=lambda t: (sign * t.values[0] if t.values else math.inf, t.number))
