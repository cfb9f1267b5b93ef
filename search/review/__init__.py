"""Reviewing a study: optuna-dashboard notes and figures, and a static HTML report.

Everything is built from what the search stored (study and trial user attrs); nothing re-runs training.

    annotate_trial(study, trial, values=values)     # by the worker loop, as each trial ends
    annotate_study(study)                            # study note and figures (one process at a time)
    write_report(study, "report.html")
"""

from __future__ import annotations

from koopman_search.search.review.dashboard import (
    FIGURE_IDS,
    AnnotationCounts,
    DashboardServer,
    Refresher,
    annotate_storage,
    annotate_study,
    annotate_trial,
    is_loopback,
    make_server_for,
)
from koopman_search.search.review.figures import (
    loss_figure,
    pareto_front_figure,
    trial_curves_figure,
    trial_figure,
    val_ppl_figure,
    weight_figure,
)
from koopman_search.search.review.notes import study_note, trial_note
from koopman_search.search.review.report import SECTION_TITLES, build_report, params_toml, write_report
from koopman_search.search.review.stored import (
    StoredBaseline,
    StoredRules,
    TrialFacts,
    read_baseline,
    read_rules,
    trial_facts,
)
from koopman_search.search.review.summary import StudySummary, best_trials, summarize

__all__ = [
    "FIGURE_IDS",
    "SECTION_TITLES",
    "AnnotationCounts",
    "DashboardServer",
    "Refresher",
    "StoredBaseline",
    "StoredRules",
    "StudySummary",
    "TrialFacts",
    "annotate_storage",
    "annotate_study",
    "annotate_trial",
    "best_trials",
    "build_report",
    "is_loopback",
    "loss_figure",
    "make_server_for",
    "params_toml",
    "pareto_front_figure",
    "read_baseline",
    "read_rules",
    "study_note",
    "summarize",
    "trial_curves_figure",
    "trial_facts",
    "trial_figure",
    "trial_note",
    "val_ppl_figure",
    "weight_figure",
    "write_report",
]
