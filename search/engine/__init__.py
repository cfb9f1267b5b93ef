"""The engine: one training job against the storage (job.py), a trial end to end (runner.py), the matched
baseline and its shared warmup (baseline.py), and the study as a queue of trials (study.py).

    study = create_or_load_study(storage, spec)      # the study, its definition stored, its budget queued
    trial = claim_waiting_trial(study)               # a WAITING trial, RUNNING now, or None
    outcome = TrialRunner(spec, study, storage, artifact_store, baseline).run(trial)

Workers (search/workers/) call it; it calls the pruners (search/pruning/) and the storage (search/storage/).
"""

from __future__ import annotations

from koopman_search.search.engine.baseline import ensure_baseline, rerun_baseline, warmup_epochs
from koopman_search.search.engine.job import CheckpointCorrupt, TrainingJob, is_environment_fault
from koopman_search.search.engine.runner import TrialOutcome, TrialRunner, format_outcome
from koopman_search.search.engine.study import (
    check_stored_definition,
    claim_waiting_trial,
    create_or_load_study,
    enqueue_retry,
    ensure_budget,
    load_study,
)

__all__ = [
    "CheckpointCorrupt",
    "TrainingJob",
    "TrialOutcome",
    "TrialRunner",
    "check_stored_definition",
    "claim_waiting_trial",
    "create_or_load_study",
    "enqueue_retry",
    "ensure_baseline",
    "ensure_budget",
    "format_outcome",
    "is_environment_fault",
    "load_study",
    "rerun_baseline",
    "warmup_epochs",
]
