"""A small finished study, as the search would have stored it, for the review tests and the browser test.

The study is built directly in SQLite with the stored layout the search writes (:mod:`search.storage.layout`:
the ``koopman_search`` and ``baseline:seed=0`` study attrs, each trial through
:func:`search.storage.layout.finished_trial`), its prune decisions made by
:class:`search.pruning.rules.PruneRules`, so no training runs here.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from koopman_search.search.pruning.rules import PruneRules
from koopman_search.search.review import make_server_for, trial_facts
from koopman_search.search.storage import layout
from koopman_search.search.storage.layout import records_to_columns, round_significant
from koopman_search.search.studyfile.spec import spec_from_dict
from koopman_search.trainer.records import K_EIGS_PER_BLOCK, EpochRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)

# ---- a small finished study, as the search would have stored it ----------------------------------------------

STUDY_NAME = "review-demo"
EPOCHS = 10
STEPS = 50
# The baseline (Koopman off, seed 0): the user's 477 at the end.
BASELINE_VAL_PPL = [1402.5, 981.3, 760.2, 641.7, 569.9, 529.4, 504.8, 490.3, 481.6, 477.2]
BASELINE_LM = [7.251, 6.894, 6.633, 6.462, 6.348, 6.271, 6.224, 6.196, 6.178, 6.164]
BASELINE_LINEAR_NRE = [round(0.2 * 0.9**e, 5) for e in range(1, 11)]  # the baseline has the head-free measure too
VAL_LOSS_SE = 0.004  # the validation set's standard error of val_loss in every epoch (0.4% of val_ppl)

DISTRIBUTIONS = {
    "koopman_weight_max": FloatDistribution(0.01, 0.5, log=True),
    "koopman_start_epoch": IntDistribution(0, 9),
    "fallback_threshold": FloatDistribution(1.0, 20.0),
    "schedule": CategoricalDistribution(["linear", "exponential", "step", "cosine"]),
    "koopman_dim": CategoricalDistribution([128, 256]),
}


@dataclass(frozen=True)
class Plan:
    """One synthetic trial: its params and how its curves bend (not a model of training, just plausible)."""

    weight_max: float
    start: int
    threshold: float
    schedule: str
    dim: int
    koopman0: float  # raw Koopman loss in the first Koopman epoch
    koopman_growth: float  # per-epoch factor
    ppl_cost: float  # val ppl ratio to the baseline at full weight
    label: str | None = None
    fail: str | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {
            "koopman_weight_max": self.weight_max,
            "koopman_start_epoch": self.start,
            "fallback_threshold": self.threshold,
            "schedule": self.schedule,
            "koopman_dim": self.dim,
        }


PLANS = [
    Plan(0.05, 4, 8.0, "linear", 128, 3.1, 0.78, 1.02, label="hand-tuned 1"),
    Plan(0.1, 5, 7.0, "exponential", 128, 2.9, 0.8, 1.05, label="hand-tuned 2"),
    Plan(0.02, 5, 6.0, "linear", 128, 3.4, 0.82, 1.01, label="hand-tuned 3"),
    # the user's original settings: the total loss climbs over 7.0 (docs/design.md, "The user's setup")
    Plan(0.5, 3, 10.0, "linear", 256, 2.06, 1.45, 1.2, label="original settings"),
    Plan(0.3, 2, 4.0, "step", 256, 6.0, 0.9, 1.6),  # val ppl jumps over 1.3 × baseline
    Plan(0.08, 3, 12.0, "cosine", 256, 2.5, 0.7, 1.03),
    Plan(0.2, 6, 9.0, "linear", 128, 2.2, 0.75, 1.09),
    Plan(0.03, 5, 5.0, "exponential", 256, 3.0, 0.72, 1.0),
    Plan(
        0.1,
        4,
        8.0,
        "linear",
        256,
        0.0,
        0.0,
        1.0,
        fail="CUDA out of memory at epoch 5 (tried to allocate 2.0 GiB)",
    ),
]


def _weight(plan: Plan, epoch: int) -> float:
    if epoch <= plan.start:
        return 0.0
    frac = (epoch - plan.start) / (EPOCHS - plan.start)
    if plan.schedule == "linear":
        return plan.weight_max * frac
    if plan.schedule == "exponential":
        return plan.weight_max * (math.exp(3 * frac) - 1) / (math.exp(3) - 1)
    if plan.schedule == "step":
        return plan.weight_max
    return plan.weight_max * 0.5 * (1 - math.cos(math.pi * frac))


def _eigs(radius: float, part: Callable[[float], float]) -> list[float]:
    """One part (cos: real, sin: imaginary) of 2 blocks × K_EIGS_PER_BLOCK eigenvalues on a circle."""
    return [radius * (1 - 0.05 * i) * part(0.7 * i + b) for b in range(2) for i in range(K_EIGS_PER_BLOCK)]


def plan_records(plan: Plan) -> list[EpochRecord]:
    records = []
    for e in range(1, EPOCHS + 1):
        on = e > plan.start
        weight = _weight(plan, e)
        koopman = plan.koopman0 * plan.koopman_growth ** (e - plan.start - 1) if on else 0.0
        fallback = max(0, round(20 * (koopman - 0.4 * plan.threshold))) if on else 0
        fallback = min(fallback, STEPS)
        effective = weight * (1 - 0.99 * fallback / STEPS)
        lm = BASELINE_LM[e - 1] + (0.4 * weight if on else 0.0)
        ppl = BASELINE_VAL_PPL[e - 1] * (1 + (plan.ppl_cost - 1) * (weight / plan.weight_max if on else 0.0))
        seconds = 96.0 if on else 78.0
        nre = 0.9 * math.exp(-5 * plan.weight_max) * 0.92 ** (e - plan.start - 1)
        records.append(
            EpochRecord(
                epoch=e,
                epochs=EPOCHS,
                lm_loss=lm,
                koopman_loss=koopman,
                total_loss=lm + effective * koopman,
                koopman_weight=weight,
                effective_weight=effective,
                fallback_batches=fallback,
                nonfinite_batches=0,
                val_loss=math.log(ppl),
                val_ppl=ppl,
                val_koopman_nre=nre if on else math.nan,
                seconds=seconds,
                tokens_per_s=STEPS * 32 * 128 / seconds,
                steps=STEPS,
                val_koopman_gain=1 / nre if on else math.nan,
                phi_effective_rank=12.0 - 4 * plan.weight_max if on else math.nan,
                state_effective_rank=9.0 if on else math.nan,
                val_koopman_forward_ppl=ppl * (1 + 2 * nre) if on else math.nan,
                koopman_k_norm=1.1 if on else math.nan,
                # two blocks, K_EIGS_PER_BLOCK eigenvalues each, on a circle whose radius grows with the Koopman loss
                koopman_k_radius=0.3 * koopman if on else math.nan,
                koopman_k_eig_re=_eigs(0.3 * koopman, math.cos) if on else [],
                koopman_k_eig_im=_eigs(0.3 * koopman, math.sin) if on else [],
                val_linear_nre=BASELINE_LINEAR_NRE[e - 1] * (1 - 0.5 * weight),  # the weight buys linearity
                val_linear_ppl=ppl * 1.02,
                val_loss_se=VAL_LOSS_SE,
            )
        )
    return records


def baseline_records() -> list[EpochRecord]:
    return [
        EpochRecord(
            epoch=e,
            epochs=EPOCHS,
            lm_loss=BASELINE_LM[e - 1],
            koopman_loss=0.0,
            total_loss=BASELINE_LM[e - 1],
            koopman_weight=0.0,
            effective_weight=0.0,
            fallback_batches=0,
            nonfinite_batches=0,
            val_loss=math.log(BASELINE_VAL_PPL[e - 1]),
            val_ppl=BASELINE_VAL_PPL[e - 1],
            val_koopman_nre=math.nan,
            seconds=78.0,
            tokens_per_s=STEPS * 32 * 128 / 78.0,
            steps=STEPS,
            val_linear_nre=BASELINE_LINEAR_NRE[e - 1],
            val_linear_ppl=BASELINE_VAL_PPL[e - 1] * 1.02,
        )
        for e in range(1, EPOCHS + 1)
    ]


def study_file_values(name: str = STUDY_NAME, objectives: list[str] | None = None) -> dict[str, Any]:
    study: dict[str, Any] = {"name": name}
    if objectives is not None:
        study["objectives"] = [{"metric": m, "direction": "minimize"} for m in objectives]
    return {"study": study, "trainer": {"train": {"epochs": EPOCHS}}}


def store_trial(
    study: optuna.Study,
    plan: Plan,
    rules: PruneRules,
    metrics: tuple[str, ...] = ("val_ppl", "val_linear_nre"),
) -> None:
    """One trial as a worker stores it: run the prune rules over its epochs, keep what it trained."""
    if plan.fail:
        study.add_trial(
            layout.finished_trial(
                TrialState.FAIL,
                plan.params,
                DISTRIBUTIONS,
                [],
                epochs_from_warmup=plan.start,
                label=plan.label,
                fail_reason=plan.fail,
            )
        )
        return
    kept: list[EpochRecord] = []
    reason = None
    for record in plan_records(plan):
        kept.append(record)
        if record.epoch > plan.start:
            reason = rules.check(record)
            if reason:
                break
    last = kept[-1]
    study.add_trial(
        layout.finished_trial(
            TrialState.PRUNED if reason else TrialState.COMPLETE,
            plan.params,
            DISTRIBUTIONS,
            kept,
            epochs_from_warmup=plan.start,
            label=plan.label,
            prune_reason=reason,
            values=None if reason else [float(f"{getattr(last, m):.6g}") for m in metrics],
        )
    )


def make_review_study(
    storage_url: str,
    plans: list[Plan] | None = None,
    name: str = STUDY_NAME,
    objectives: list[str] | None = None,
) -> optuna.Study:
    """The finished two-objective study the review tests look at (COMPLETE, PRUNED and FAIL trials)."""
    spec = spec_from_dict(study_file_values(name, objectives), origin="review.toml")
    directions = [optuna.study.StudyDirection[d.upper()] for d in spec.directions]
    study = optuna.create_study(study_name=name, storage=storage_url, directions=directions)
    layout.store_definition(study, spec)
    base = baseline_records()
    layout.set_study_attr(
        study,
        layout.baseline_key(0),
        {
            "state": "complete",
            "records": records_to_columns(base),
            "val_ppl": [round_significant(r.val_ppl) for r in base],
            "error": None,
            "checkpoints": {},
        },
    )
    rules = PruneRules.from_spec(spec.rules, [r.val_ppl for r in base])
    for plan in PLANS if plans is None else plans:
        store_trial(study, plan, rules, tuple(spec.metrics))
    return study


def _trial(study: optuna.Study, state: TrialState, label: str | None = None) -> optuna.trial.FrozenTrial:
    for t in study.get_trials(states=(state,)):
        if label is None or t.user_attrs.get("label") == label:
            return t
    raise LookupError(f"no {state.name} trial labelled {label!r}")


def _facts(study: optuna.Study, state: TrialState, label: str | None = None) -> Any:
    return trial_facts(_trial(study, state, label))


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@contextmanager
def dashboard_at(url: str, artifact_store: Any | None = None) -> Iterator[str]:
    """koopman-search's dashboard server on ``url``'s storage, on a free loopback port, serving in a thread
    while the block runs; yields its base address (``http://127.0.0.1:PORT``)."""
    server = make_server_for(url, "127.0.0.1", 0, artifact_store)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
