"""Markdown notes for optuna-dashboard: one per finished trial, one for the study.

A trial's note says, in a few lines, what it tried, how it ended (result, or prune reason and epoch),
how its val perplexity compares with the baseline at the same epoch, and what it cost and saved.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from optuna.trial import TrialState

from koopman_search.search.review.stored import StoredBaseline, StoredRules, TrialFacts
from koopman_search.search.review.summary import (
    MIN_TRIALS_FOR_IMPORTANCE,
    StudySummary,
    fmt,
    fmt_param,
    fmt_seconds,
    state_word,
)
from koopman_search.search.text import printable

__all__ = ["study_note", "trial_note"]

logger = logging.getLogger(__name__)

FIGURES_HINT = (
    "Curves of every trial: the *Training losses*, *Val perplexity*, *Linearity error* and *Koopman weight* "
    "figures on the study page"
)


# optuna-dashboard draws a note's markdown tables without cell padding, so adjacent cells run together
# ("this trial baseline", "529.4 1.086×"); non-breaking spaces before every cell but the first keep them
# apart (markdown trims plain spaces in a cell, not these)
CELL_PAD = "&nbsp;" * 3


# Where the study's answer is written out in full (search/review/recommend.py)
RECOMMEND_LINE = (
    "**Recommendation:** `koopman-search recommend STUDY.toml` (`--lang ja` in Japanese) writes the study's answer "
    "as a hand-tuning report: the problems found, three options from the front with their settings and "
    "effects, and the success and retune indicators."
)


def _pad_tables(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.startswith("| ") and line.endswith(" |"):
            cells = line[2:-2].split(" | ")
            line = "| " + " | ".join([cells[0], *(CELL_PAD + c for c in cells[1:])]) + " |"
        out.append(line)
    return out


_MARKDOWN = re.compile(r"([\\`*_\[\]<|~&])")  # what can open emphasis, code, a link or image, HTML, a cell


def _escape(text: str) -> str:
    """Text safe inside a markdown table cell or emphasis: control characters and line breaks become spaces,
    and every character that could start markup (a link, an image, HTML, code, emphasis, a cell) is escaped,
    so a label can never load anything or break the note's layout."""
    return _MARKDOWN.sub(r"\\\1", printable(text, " "))


def _ratio_text(value: float | None, reference: float | None, limit: float | None) -> str:
    if value is None or reference is None or reference <= 0:
        return "n/a"
    ratio = value / reference
    text = f"{ratio:.3f}×"
    if limit is not None:
        text += f" (limit {fmt(limit)}×{', over' if ratio > limit else ''})"
    return text


def _at(values: Sequence[float | None], index: int) -> float | None:
    return values[index] if 0 <= index < len(values) else None


def _comparison(trial: TrialFacts, baseline: StoredBaseline | None, rules: StoredRules) -> list[str]:
    """A table of the trial's last epoch against the baseline's same epoch."""
    epochs = trial.epoch_numbers
    if not epochs:
        return ["No epoch records were stored for this trial."]
    epoch = epochs[-1]
    i = len(epochs) - 1
    ppl = _at(trial.metric("val_ppl"), i)
    total = _at(trial.metric("total_loss"), i)
    base_ppl = baseline.at(epoch) if baseline is not None else None
    base_total = None
    if baseline is not None and baseline.columns:
        base_epochs = [int(e) for e in baseline.columns.get("epoch", [])]
        if epoch in base_epochs:
            base_total = _at(baseline.columns.get("total_loss", []), base_epochs.index(epoch))
    total_limit = f"limit {fmt(rules.total_loss_max)}" if rules.total_loss_max is not None else ""
    lines = [
        f"| at epoch {epoch} | this trial | baseline | ratio or limit |",
        "|---|---:|---:|---|",
        f"| val perplexity | {fmt(ppl)} | {fmt(base_ppl)} | {_ratio_text(ppl, base_ppl, rules.val_ppl_ratio_max)} |",
        f"| total loss | {fmt(total)} | {fmt(base_total)} | {total_limit} |",
    ]
    nre = _at(trial.metric("val_koopman_nre"), i)
    if nre is not None:
        lines.append(f"| val Koopman NRE (1 − R²) | {fmt(nre)} | | |")
    forward = _at(trial.metric("val_koopman_forward_ppl"), i)
    if forward is not None:
        lines.append(
            f"| Koopman-forward perplexity (blocks → ψ ∘ K ∘ φ) | {fmt(forward)} | {fmt(base_ppl)} | "
            f"{_ratio_text(forward, base_ppl, None)} |"
        )
    gain = _at(trial.metric("val_koopman_gain"), i)
    if gain is not None:
        lines.append(f"| K's gain over the identity | {fmt(gain)}× | | |")
    rank = _at(trial.metric("phi_effective_rank"), i)
    if rank is not None:
        state_rank = _at(trial.metric("state_effective_rank"), i)
        lines.append(f"| φ effective rank | {fmt(rank)} | | the states' own: {fmt(state_rank)} |")
    if baseline is None:
        lines.append("")
        lines.append("No baseline is stored for this study, so there is nothing to compare with.")
    return lines


def _epochs_line(trial: TrialFacts) -> str:
    total = trial.epochs_total
    parts = [f"{trial.epochs_run} trained"]
    if trial.epochs_from_warmup:
        parts.append(f"{trial.epochs_from_warmup} taken from the baseline's shared warmup")
    if trial.state == TrialState.PRUNED.name:
        by = "the prune rules" if trial.pruned_by == "rules" else f"the {trial.pruned_by} pruner"
        parts.append(f"{trial.epochs_saved_by_pruning} saved by {by}")
    head = f"**Epochs:** {total} in a full run: " if total else "**Epochs:** "
    line = head + ", ".join(parts)
    if trial.train_seconds:
        line += f"; training took {fmt_seconds(trial.train_seconds)}"
    return line + "."


def trial_note(
    trial: TrialFacts,
    names: Sequence[str],
    baseline: StoredBaseline | None,
    rules: StoredRules,
    image: str | None = None,
) -> str:
    """The note of one finished trial (markdown, a dozen lines); ``image``, the Markdown of its curves image
    (search/review/trial_image.py), goes first under the heading."""
    heading = f"### Trial {trial.number}: {state_word(trial.state)}"
    if trial.state == TrialState.PRUNED.name and trial.pruned_epoch is not None:
        heading += f" at epoch {trial.pruned_epoch}"
    if trial.label:
        heading += f" · {_escape(trial.label)}"
    lines = [heading, ""]
    if image:
        lines += [image, ""]
    if trial.state == TrialState.PRUNED.name:
        lines.append(f"**Pruned:** {_escape(trial.prune_reason or 'no reason stored')}")
    elif trial.state == TrialState.FAIL.name:
        lines.append(f"**Failed:** {_escape(trial.fail_reason or 'no reason stored')}")
    elif trial.values is not None:
        results = ", ".join(f"{_escape(n)} = {fmt(v)}" for n, v in zip(names, trial.values, strict=False))
        lines.append(f"**Result:** {results}")
    else:
        lines.append(f"**State:** {state_word(trial.state)}, no result stored")
    lines += ["", *_comparison(trial, baseline, rules), ""]
    lines.append(_epochs_line(trial))
    if trial.asha_rungs:
        rungs = "; ".join(
            f"rung {d.get('rung')} (epoch {d.get('epoch')}): rank {d.get('rank')} of {d.get('of')}, "
            f"{'kept' if (d.get('rank') or 0) <= (d.get('keep') or 0) else 'pruned'} (top {d.get('keep')} continue)"
            for d in trial.asha_rungs
        )
        lines += ["", f"**asha rungs:** {_escape(rungs)}."]
    if trial.params:  # one row: five columns fit a dashboard card where a sentence would overflow it
        lines += [
            "",
            "| " + " | ".join(_escape(k) for k in trial.params) + " |",
            "|" + "---|" * len(trial.params),
            "| " + " | ".join(_escape(fmt_param(v)) for v in trial.params.values()) + " |",
        ]
    lines += ["", f"{FIGURES_HINT}; pick trial {trial.number} in their menus."]
    return "\n".join(_pad_tables(lines)) + "\n"


def study_note(
    study_name: str,
    names: Sequence[str],
    directions: Sequence[str],
    summary: StudySummary,
    baseline: StoredBaseline | None,
    rules: StoredRules,
    best: Sequence[TrialFacts],
    findings: Sequence[str] = (),
) -> str:
    """The study's note: objectives and rules, baseline, trials, compute, how close the rules came and what
    the front shows (``findings``, search/review/reach.py), and the best trial(s)."""
    objectives = ", ".join(f"{d} {_escape(n)}" for n, d in zip(names, directions, strict=False))
    lines = [f"## {_escape(study_name)}", "", f"**Objectives:** {objectives}."]
    limits = []
    if rules.total_loss_max is not None:
        limits.append(f"total loss > {fmt(rules.total_loss_max)}")
    if rules.val_ppl_ratio_max is not None:
        limits.append(f"val perplexity > {fmt(rules.val_ppl_ratio_max)} × baseline at the same epoch")
    if limits:
        lines.append(f"**Pruned when:** {' or '.join(limits)}, or a metric is NaN.")
    if baseline is None:
        lines.append("**Baseline:** none stored yet.")
    else:
        known = [v for v in baseline.val_ppl if v is not None]
        text = f"**Baseline** (Koopman off, seed {baseline.seed}, {baseline.state}): "
        if known:  # a baseline that runs, was interrupted or failed has no curve yet
            text += f"val perplexity {fmt(known[0])} → {fmt(known[-1])} over {len(baseline.val_ppl)} epochs"
        else:
            text += "no curve yet"
        if baseline.error:
            text += f"; error: {_escape(baseline.error)}"
        lines.append(text + ".")
    lines += ["", f"**Trials:** {summary.states_text()}.", f"**Compute:** {summary.compute_text()}", ""]
    complete = summary.states.get("COMPLETE", 0)
    if complete < MIN_TRIALS_FOR_IMPORTANCE:
        lines += [
            f"**Hyperparameter importance** is left empty, in the dashboard and in the HTML report, until "
            f"{MIN_TRIALS_FOR_IMPORTANCE} trials are complete ({complete} so far): fitted on fewer, it is noise.",
            "",
        ]
    if findings:
        lines += ["**Findings:**", "", *(f"- {_escape(line)}." for line in findings), ""]
    if best:
        count = f"{len(best)} trial" + ("s" if len(best) != 1 else "")
        title = "Best trial" if len(names) == 1 else f"Pareto front ({count})"
        lines += [f"**{title}:**", ""]
        header = ["trial", "label", *(_escape(n) for n in names)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for trial in best:
            values = [fmt(v) for v in trial.values or ()]
            lines.append("| " + " | ".join([str(trial.number), _escape(trial.label or ""), *values]) + " |")
        lines += ["", RECOMMEND_LINE]
    else:
        lines.append("No trial has completed yet.")
    return "\n".join(_pad_tables(lines)) + "\n"
