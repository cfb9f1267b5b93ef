"""One trial's curves as a static image, for the top of its optuna-dashboard page.

optuna-dashboard draws interactive figures on the study's page only (``save_plotly_graph_object``), below its
own Pareto, history and timeline plots. A trial's page shows its note, and a note is Markdown that may show an
image from the study's artifact store: so the trial's own curves go there, first, as an SVG drawn with
matplotlib (no browser needed, unlike a static export of a plotly figure):

- val perplexity against the baseline's and the 1.3× limit band, with the pruning epoch marked;
- the training losses against the total-loss limit;
- the linearity error ``val_linear_nre`` against the baseline's own.

The image is drawn once per trial, from its final records, and uploaded as an artifact of the study (Optuna
refuses new attrs on a finished trial, so not of the trial): :func:`trial_image_markdown`. A second call
finds it by the study system attr ``koopman_search:curves_image:<trial id>`` and uploads nothing.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from optuna.trial import TrialState

from koopman_search.search.review.stored import StoredBaseline, StoredRules, TrialFacts
from koopman_search.search.storage.layout import CURVES_IMAGE
from koopman_search.search.storage.optuna_private import storage_of, study_id_of

__all__ = ["trial_curves_svg", "trial_image_markdown"]

logger = logging.getLogger(__name__)

_COLORS = {"trial": "#1f77b4", "baseline": "#222222", "limit": "#d62728", "band": "#2ca02c", "lm": "#1f77b4"}


def _values(column: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in column]


def _mark_pruned(ax: Any, trial: TrialFacts, epochs: list[int], column: list[float]) -> None:
    epoch = trial.pruned_epoch if trial.state == TrialState.PRUNED.name else None
    if epoch is not None and epoch in epochs:
        ax.plot([epoch], [column[epochs.index(epoch)]], "x", color=_COLORS["limit"], ms=10, mew=2, label="pruned here")


def _val_ppl(ax: Any, trial: TrialFacts, baseline: StoredBaseline | None, rules: StoredRules) -> None:
    epochs, ppl = trial.epoch_numbers, _values(trial.metric("val_ppl"))
    if baseline is not None and baseline.val_ppl:
        base = _values(list(baseline.val_ppl))
        x = list(range(1, len(base) + 1))
        ax.plot(x, base, color=_COLORS["baseline"], lw=1.5, label="baseline")
        if rules.val_ppl_ratio_max is not None:
            limit = [rules.val_ppl_ratio_max * v for v in base]
            ax.fill_between(x, base, limit, color=_COLORS["band"], alpha=0.15, lw=0)
            ax.plot(x, limit, "--", color=_COLORS["limit"], lw=1.2, label=f"limit {rules.val_ppl_ratio_max:g}×")
    ax.plot(epochs, ppl, "o-", color=_COLORS["trial"], lw=2, ms=4, label=f"trial {trial.number}")
    _mark_pruned(ax, trial, epochs, ppl)
    ax.set_title("val perplexity vs baseline", fontsize=10, loc="left")


def _losses(ax: Any, trial: TrialFacts, rules: StoredRules) -> None:
    epochs = trial.epoch_numbers
    total = _values(trial.metric("total_loss"))
    ax.plot(epochs, total, "o-", color="#ff7f0e", lw=2, ms=4, label="total loss")
    ax.plot(epochs, _values(trial.metric("lm_loss")), ".-", color=_COLORS["lm"], lw=1, label="LM loss")
    limit = rules.total_loss_max
    if limit is not None:
        ax.axhline(limit, ls="--", color=_COLORS["limit"], lw=1.2, label=f"limit {limit:g}")
    if trial.prune_reason and trial.prune_reason.startswith("total_loss"):
        _mark_pruned(ax, trial, epochs, total)
    ax.set_title("training losses", fontsize=10, loc="left")


def _linearity(ax: Any, trial: TrialFacts, baseline: StoredBaseline | None) -> None:
    own = _values((baseline.columns or {}).get("val_linear_nre") or []) if baseline is not None else []
    if any(math.isfinite(v) for v in own):
        ax.plot(range(1, len(own) + 1), own, color=_COLORS["baseline"], lw=1.5, label="baseline")
    epochs, nre = trial.epoch_numbers, _values(trial.metric("val_linear_nre"))
    ax.plot(epochs, nre, "o-", color=_COLORS["trial"], lw=2, ms=4, label=f"trial {trial.number}")
    if trial.pruned_by not in (None, "rules"):  # a pruner ranks on both objectives
        _mark_pruned(ax, trial, epochs, nre)
    ax.set_title("linearity error val_linear_nre (lower: more linear)", fontsize=10, loc="left")


def trial_curves_svg(trial: TrialFacts, baseline: StoredBaseline | None, rules: StoredRules) -> bytes:
    """The three panels side by side, 1,200 × 300 px, as SVG (text as paths: no font needed to show it)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 3), dpi=100, layout="constrained")
    panels = fig.subplots(1, 3)
    _val_ppl(panels[0], trial, baseline, rules)
    _losses(panels[1], trial, rules)
    _linearity(panels[2], trial, baseline)
    for ax in panels:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    out = io.BytesIO()
    fig.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue()


def trial_image_markdown(
    study: Any,
    trial: TrialFacts,
    baseline: StoredBaseline | None,
    rules: StoredRules,
    artifact_store: Any,
) -> str | None:
    """The Markdown that shows the trial's curves image (uploaded on the first call), or None when the trial
    has no records or the image cannot be made or stored (logged: a review problem never fails a worker)."""
    if not trial.epoch_numbers:
        return None
    storage, study_id = storage_of(study), study_id_of(study)
    key = f"{CURVES_IMAGE}:{trial.trial_id}"
    artifact_id = storage.get_study_system_attrs(study_id).get(key)
    if not artifact_id:
        try:
            artifact_id = _upload(study, trial, trial_curves_svg(trial, baseline, rules), artifact_store)
        except Exception as exc:  # matplotlib, the artifact store: the note is written without the image
            debug = logger.isEnabledFor(logging.DEBUG)
            logger.warning("could not make the curves image of trial %d: %s", trial.number, exc, exc_info=debug)
            return None
        storage.set_study_system_attr(study_id, key, artifact_id)
    alt = f"Trial {trial.number}: val perplexity, losses and linearity per epoch"
    return f"![{alt}](/artifacts/{study_id}/{artifact_id})"


def _upload(study: Any, trial: TrialFacts, svg: bytes, artifact_store: Any) -> str:
    import optuna

    with tempfile.TemporaryDirectory(prefix="koopman-search-image-") as tmp:
        path = os.path.join(tmp, f"trial-{trial.number}-curves.svg")
        with open(path, "wb") as fh:
            fh.write(svg)
        return optuna.artifacts.upload_artifact(
            artifact_store=artifact_store,
            file_path=path,
            study_or_trial=study,
            mimetype="image/svg+xml",
        )
