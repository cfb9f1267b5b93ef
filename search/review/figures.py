"""Plotly figures built from stored epoch records (never from re-running anything).

Four views of a trial's records, each with the study's limits drawn:

- ``"losses"``: LM, Koopman and total loss per epoch, with the total-loss limit (7.0 by default);
- ``"val_ppl"``: val perplexity with the baseline curve and the band up to ratio × baseline (1.3×);
- ``"linearity"``: the linearity error ``val_linear_nre`` (docs/koopman-objective.md) with the baseline's;
- ``"weight"``: scheduled vs effective Koopman weight, fallback batches as bars on a second axis, each epoch
  one slot of the x axis (a weight holds over its epoch: its step and its bar span the same slot).

:func:`trial_figure` draws one trial. :func:`trial_curves_figure` draws every finished trial of a study in
one figure: all of them faint in the background (losses and val_ppl), one highlighted, and a dropdown to
pick which; the dropdown swaps the highlighted trial's data, so the figure stays small for large studies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState

from koopman_search.search.review.stored import StoredBaseline, StoredRules, TrialFacts
from koopman_search.search.review.summary import fmt, state_word
from koopman_search.trainer.records import K_EIGS_PER_BLOCK

__all__ = [
    "KINDS",
    "loss_figure",
    "pareto_front_figure",
    "spectrum_figure",
    "trial_curves_figure",
    "trial_figure",
    "trial_label",
    "val_ppl_figure",
    "weight_figure",
]

logger = logging.getLogger(__name__)

KINDS = ("losses", "val_ppl", "linearity", "weight")
MAX_DROPDOWN_TRIALS = 500  # menu entries: the most recent trials (the background shows them all)

COLORS = {
    "lm": "#1f77b4",
    "koopman": "#9467bd",
    "total": "#ff7f0e",
    "val_ppl": "#1f77b4",
    "baseline": "#222222",
    "limit": "#d62728",
    "band": "rgba(44, 160, 44, 0.13)",
    "others": "rgba(110, 110, 110, 0.45)",
    "scheduled": "#7f7f7f",
    "effective": "#2ca02c",
    "fallback": "rgba(214, 39, 40, 0.35)",
    "dominated": "#9e9e9e",
    "pareto": "#1f77b4",
}
_TITLES = {  # short: optuna-dashboard's toolbar takes the right half of a card's top line
    "losses": "Training losses per epoch",
    "val_ppl": "Val perplexity vs baseline",
    "linearity": "Linearity error vs baseline",
    "weight": "Koopman weight per epoch",
}
_HEIGHT = 450  # optuna-dashboard shows study figures in 450 px high cards


def trial_label(trial: TrialFacts, names: Sequence[str] = ()) -> str:
    """``Trial 7 · pruned at epoch 7 · hand-tuned 1`` or ``Trial 4 · val_ppl 489.1``: what a menu entry
    or a title calls a trial (with ``names``, a complete trial shows its first objective)."""
    if trial.state == TrialState.COMPLETE.name and trial.values and names:
        state = f"{names[0]} {fmt(trial.values[0])}"
    else:
        state = state_word(trial.state)
        if trial.state == TrialState.PRUNED.name and trial.pruned_epoch is not None:
            state += f" at epoch {trial.pruned_epoch}"
    parts = [f"Trial {trial.number}", state]
    if trial.label:
        parts.append(trial.label)
    return " · ".join(parts)


def _epochs(trial: TrialFacts) -> list[int]:
    return trial.epoch_numbers


def _limit_curve(baseline: StoredBaseline, ratio: float) -> list[float | None]:
    return [None if v is None else ratio * v for v in baseline.val_ppl]


def _pruned_on(trial: TrialFacts) -> str | None:
    """The metric whose curve shows why the trial was pruned: the total loss for the total-loss rule, val_ppl
    for the ratio rule and for the pruner (whose first objective is val_ppl in the shipped studies), None for
    another reason (a NaN, a collapse floor)."""
    reason = trial.prune_reason or ""
    if reason.startswith("total_loss"):
        return "total_loss"
    if reason.startswith("val_ppl") or trial.pruned_by not in (None, "rules"):
        return "val_ppl"
    return None


def _prune_marker(trial: TrialFacts, metric: str) -> dict[str, Any]:
    """The point where the trial was pruned, on ``metric``'s curve when that is what it was pruned on (a
    pruner ranks on both objectives: its marker is on the linearity curve too), hovering the reason."""
    epoch = trial.pruned_epoch if trial.prune_reason else None
    epochs = _epochs(trial)
    on = _pruned_on(trial)
    by_pruner = trial.pruned_by not in (None, "rules") and metric == "val_linear_nre"
    if epoch is None or epoch not in epochs or (on != metric and not by_pruner):
        return {"x": [], "y": [], "text": []}
    value = trial.metric(metric)[epochs.index(epoch)]
    return {"x": [epoch], "y": [value], "text": [trial.prune_reason or ""]}


def _slot_data(kind: str, trial: TrialFacts) -> list[dict[str, Any]]:
    """Data of the traces that show one trial, in the order :func:`_slot_traces` creates them."""
    x = _epochs(trial)
    if kind == "losses":
        # the trainer records a Koopman loss of 0 while the term is off; a gap says "off" more plainly
        weights = trial.metric("koopman_weight")
        koopman = [
            None if k == 0 and i < len(weights) and not weights[i] else k
            for i, k in enumerate(trial.metric("koopman_loss"))
        ]
        return [  # the total first, so that the LM loss (often just under it) is drawn on top
            {"x": x, "y": trial.metric("total_loss")},
            {"x": x, "y": trial.metric("lm_loss")},
            {"x": x, "y": koopman},
            _prune_marker(trial, "total_loss"),
        ]
    if kind == "val_ppl":
        return [{"x": x, "y": trial.metric("val_ppl")}, _prune_marker(trial, "val_ppl")]
    if kind == "linearity":
        return [{"x": x, "y": trial.metric("val_linear_nre")}, _prune_marker(trial, "val_linear_nre")]
    if kind == "weight":
        return [
            _epoch_slots(x, trial.metric("effective_weight")),
            _epoch_slots(x, trial.metric("koopman_weight")),
            {"x": x, "y": trial.metric("fallback_batches")},
        ]
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, but got kind={kind!r}")


def _epoch_slots(x: list[int], y: list[float | None]) -> dict[str, Any]:
    """A per-epoch value drawn as a step over its epoch's slot, e - 0.5 to e + 0.5 (with ``shape="hvh"``):
    the end points repeat the first and last values half an epoch out, so the last epoch is as wide as the
    others and lines up with its bar."""
    if not x:
        return {"x": [], "y": []}
    return {"x": [x[0] - 0.5, *x, x[-1] + 0.5], "y": [y[0] if y else None, *y, y[-1] if y else None]}


def _slot_traces(kind: str, trial: TrialFacts) -> list[go.Scatter | go.Bar]:
    data = _slot_data(kind, trial)
    marker_style = {
        "mode": "markers",
        "marker": {"symbol": "x", "size": 13, "color": COLORS["limit"], "line": {"width": 1}},
        "name": "pruned here",
        "hovertemplate": "pruned: %{text}<extra></extra>",
    }
    if kind == "losses":
        return [
            go.Scatter(  # wide and pale underneath: where it equals the LM loss, the LM line shows on it
                **data[0],
                name="total loss = LM + weight × Koopman",
                mode="lines+markers",
                line={"color": COLORS["total"], "width": 7},
                marker={"size": 11},
                opacity=0.45,
            ),
            go.Scatter(
                **data[1],
                name="LM loss",
                mode="lines+markers",
                line={"color": COLORS["lm"], "width": 2},
                marker={"size": 6},
            ),
            go.Scatter(
                **data[2],
                name="Koopman loss, raw (right axis)",
                mode="lines+markers",
                line={"color": COLORS["koopman"], "dash": "dot"},
                marker={"symbol": "diamond"},
                yaxis="y2",
            ),
            go.Scatter(**data[3], **marker_style),
        ]
    if kind in ("val_ppl", "linearity"):
        return [
            go.Scatter(
                **data[0],
                name="this trial",
                mode="lines+markers",
                line={"color": COLORS["val_ppl"], "width": 3},
            ),
            go.Scatter(**data[1], **marker_style),
        ]
    # A weight is constant over its epoch, so both are drawn as steps over the epoch's slot (_epoch_slots):
    # a `step` schedule then reads as the jump it is, not as a ramp, and the fallback bar of an epoch sits
    # under its weight.
    return [  # applied first, so that the dotted schedule stays visible where the two agree
        go.Scatter(
            **data[0],
            name="applied weight (mean over batches)",
            mode="lines",
            line={"color": COLORS["effective"], "width": 3, "shape": "hvh"},
        ),
        go.Scatter(
            **data[1],
            name="scheduled weight",
            mode="lines",
            line={"color": COLORS["scheduled"], "dash": "dot", "width": 2, "shape": "hvh"},
        ),
        go.Bar(
            **data[2],
            width=0.9,
            name="fallback batches (right axis)",
            marker={"color": COLORS["fallback"]},
            yaxis="y2",
        ),
    ]


def _background_trace(kind: str, trials: Sequence[TrialFacts]) -> go.Scatter | None:
    """Every trial's curve as one faint trace (None between trials), for context behind the chosen one."""
    metric = {"losses": "total_loss", "val_ppl": "val_ppl", "linearity": "val_linear_nre"}.get(kind)
    if metric is None:
        return None
    xs: list[int | None] = []
    ys: list[float | None] = []
    who: list[str] = []
    for trial in trials:
        epochs = _epochs(trial)
        if not epochs:
            continue
        xs += [*epochs, None]
        ys += [*trial.metric(metric), None]
        who += [trial_label(trial)] * len(epochs) + [""]
    if not xs:
        return None
    name = "all trials' total loss" if kind == "losses" else "all trials"
    return go.Scatter(
        x=xs,
        y=ys,
        text=who,
        name=name,
        mode="lines",
        line={"color": COLORS["others"], "width": 1},
        hovertemplate="%{text}<br>epoch %{x}: %{y}<extra></extra>",
    )


def _fixed_traces(
    kind: str, epochs: int | None, baseline: StoredBaseline | None, rules: StoredRules
) -> list[go.Scatter]:
    """The references: the total-loss limit, or the baseline and its allowed band."""
    traces: list[go.Scatter] = []
    if kind == "losses" and rules.total_loss_max is not None and epochs:
        limit = rules.total_loss_max
        traces.append(
            go.Scatter(
                x=[1, epochs],
                y=[limit, limit],
                name=f"total loss limit {fmt(limit)} (pruned above)",
                mode="lines",
                line={"color": COLORS["limit"], "dash": "dash", "width": 2},
                hovertemplate=f"total loss limit {fmt(limit)}<extra></extra>",
            )
        )
    if kind == "linearity" and baseline is not None and baseline.columns:
        own = [None if v is None else float(v) for v in baseline.columns.get("val_linear_nre") or []]
        if any(v is not None and math.isfinite(v) for v in own):
            traces.append(
                go.Scatter(
                    x=list(range(1, len(own) + 1)),
                    y=own,
                    name=f"baseline (Koopman off, seed {baseline.seed})",
                    mode="lines+markers",
                    line={"color": COLORS["baseline"], "width": 2},
                )
            )
    if kind == "val_ppl" and baseline is not None and baseline.val_ppl:
        x = list(range(1, len(baseline.val_ppl) + 1))
        traces.append(
            go.Scatter(
                x=x,
                y=list(baseline.val_ppl),
                name=f"baseline (Koopman off, seed {baseline.seed})",
                mode="lines+markers",
                line={"color": COLORS["baseline"], "width": 2},
            )
        )
        ratio = rules.val_ppl_ratio_max
        if ratio is not None:
            traces.append(
                go.Scatter(
                    x=x,
                    y=_limit_curve(baseline, ratio),
                    name=f"limit {fmt(ratio)} × baseline (pruned above)",
                    mode="lines",
                    line={"color": COLORS["limit"], "dash": "dash", "width": 2},
                    fill="tonexty",
                    fillcolor=COLORS["band"],
                )
            )
    return traces


def _layout(
    kind: str, title: str, trials: Sequence[TrialFacts], menu: bool = False, limit: float | None = None
) -> dict[str, Any]:
    """Sized for optuna-dashboard's 450 px cards: title top left, the trial menu under it, legend below."""
    y_titles = {
        "losses": "loss (mean over the epoch's batches)",
        "val_ppl": "validation perplexity",
        "linearity": "val_linear_nre (lower: more linear)",
        "weight": "Koopman weight",
    }
    layout: dict[str, Any] = {
        "title": {"text": title, "x": 0.01, "xanchor": "left", "y": 0.985, "yanchor": "top", "font": {"size": 15}},
        "height": _HEIGHT,
        "template": "plotly_white",
        "margin": {"l": 60, "r": 20 if kind in ("val_ppl", "linearity") else 60, "t": 82 if menu else 40, "b": 110},
        "xaxis": {"title": {"text": "epoch", "standoff": 2}, "dtick": 1},
        "yaxis": {"title": {"text": y_titles[kind]}},
        "legend": {"orientation": "h", "yanchor": "top", "y": -0.16, "x": 0, "font": {"size": 11}},
        "hovermode": "closest",
    }
    if kind == "val_ppl":
        values = [v for t in trials for v in t.metric("val_ppl") if v is not None]
        if values and max(values) / max(min(values), 1e-9) > 20:
            layout["yaxis"]["type"] = "log"  # one diverged trial would flatten every other curve
    if kind == "losses":
        _loss_axes(layout, trials, limit)
    if kind == "weight":
        last = max((e for t in trials for e in _epochs(t)), default=1)
        layout["xaxis"]["range"] = [0.5, last + 0.5]  # each epoch one slot, e - 0.5 to e + 0.5
        weights = [
            v
            for t in trials
            for m in ("effective_weight", "koopman_weight")
            for v in t.metric(m)
            if v is not None and math.isfinite(v)
        ]
        layout["yaxis"].update(_nice_ticks(max(weights, default=0.0)))
        # one fixed scale for every trial in the menu, in whole batches
        most = max((v for t in trials for v in t.metric("fallback_batches") if v is not None), default=0)
        layout["yaxis2"] = {
            "title": {"text": "fallback batches"},
            "tickformat": "d",
            "overlaying": "y",
            "side": "right",
            "range": [0, max(most, 1) * 1.1],
            "dtick": max(1, math.ceil(most / 5)),
            "showgrid": False,
        }
        layout["barmode"] = "overlay"
    return layout


def _nice_ticks(top: float, count: int = 5) -> dict[str, Any]:
    """Ticks from 0 to ``top`` at a round step (1, 2 or 5 × 10^k) with one number of decimals for all of them:
    0, 0.5, 1.0, 1.5 or 0, 0.02, 0.04, never 0.039, 1.2, 2.4."""
    if not math.isfinite(top) or top <= 0:
        return {}
    raw = top / (count + 1)  # at most count + 1 steps
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return {"tick0": 0, "dtick": step, "tickformat": f".{decimals}f"}


def _loss_axes(layout: dict[str, Any], trials: Sequence[TrialFacts], limit: float | None) -> None:
    """The Koopman loss on its own right axis: next to a total loss near 7 a falling Koopman loss of 0.05
    would be a flat line. One range for every trial in the menu, with headroom: the Koopman loss is highest at
    its first epoch, and at the top of its own axis that point would sit level with the total-loss limit and
    read as "hit the limit"."""
    koopman = [v for t in trials for v in t.metric("koopman_loss") if v is not None and math.isfinite(v) and v > 0]
    layout["yaxis2"] = {
        "title": {"text": "Koopman loss (raw)", "font": {"color": COLORS["koopman"]}},
        "tickfont": {"color": COLORS["koopman"]},
        "overlaying": "y",
        "side": "right",
        "showgrid": False,
    }
    left = [
        v for t in trials for m in ("total_loss", "lm_loss") for v in t.metric(m) if v is not None and math.isfinite(v)
    ]
    peak_height = 0.5  # of the plot's height, where the highest Koopman loss is drawn
    if left and limit is not None:
        lo, hi = min(left), max(max(left), limit)
        pad = 0.08 * max(hi - lo, 0.1)
        layout["yaxis"]["range"] = [lo - pad, hi + pad]
        limit_height = (limit - lo + pad) / (hi - lo + 2 * pad)
        if abs(peak_height - limit_height) < 0.25:
            peak_height = limit_height - 0.3 if limit_height > 0.5 else limit_height + 0.3
    if koopman:
        top = max(koopman) / peak_height
        layout["yaxis2"]["range"] = [0, top]
        layout["yaxis2"].update(_nice_ticks(top))
    else:
        layout["yaxis2"]["rangemode"] = "tozero"


def trial_figure(
    kind: str, trial: TrialFacts, baseline: StoredBaseline | None = None, rules: StoredRules | None = None
) -> go.Figure:
    """One view (see :data:`KINDS`) of one trial, with the study's limits drawn."""
    rules = rules or StoredRules()
    fig = go.Figure()
    for trace in _fixed_traces(kind, trial.epochs_total, baseline, rules):
        fig.add_trace(trace)
    for trace in _slot_traces(kind, trial):
        fig.add_trace(trace)
    fig.update_layout(_layout(kind, f"{_TITLES[kind]}: {trial_label(trial)}", [trial], limit=rules.total_loss_max))
    return fig


def loss_figure(trial: TrialFacts, rules: StoredRules | None = None) -> go.Figure:
    """LM / Koopman / total loss per epoch with the total-loss limit."""
    return trial_figure("losses", trial, None, rules)


def val_ppl_figure(trial: TrialFacts, baseline: StoredBaseline | None, rules: StoredRules | None = None) -> go.Figure:
    """Val perplexity with the baseline curve and the ratio × baseline band."""
    return trial_figure("val_ppl", trial, baseline, rules)


def weight_figure(trial: TrialFacts) -> go.Figure:
    """Scheduled vs effective Koopman weight, fallback batches as bars on the right axis."""
    return trial_figure("weight", trial)


def trial_curves_figure(
    kind: str,
    trials: Sequence[TrialFacts],
    baseline: StoredBaseline | None = None,
    rules: StoredRules | None = None,
    *,
    selected: int | None = None,
    names: Sequence[str] = (),
) -> go.Figure:
    """One view of every trial with records: the trial numbered ``selected`` (default: the first)
    highlighted, a dropdown to switch, and (losses, val_ppl) all trials faint behind it. ``names`` (the
    objectives) let menu entries show a complete trial's first objective."""
    rules = rules or StoredRules()
    drawn = sorted((t for t in trials if t.epoch_numbers), key=lambda t: t.number)
    shown = drawn[-MAX_DROPDOWN_TRIALS:]  # the menu; the selected trial stays in it
    if selected is not None and selected not in {t.number for t in shown}:
        shown = [t for t in drawn if t.number == selected] + shown
    epochs = max((t.epochs_total or 0 for t in drawn), default=0) or (
        len(baseline.val_ppl) if baseline is not None else 0
    )
    fig = go.Figure()
    background = _background_trace(kind, drawn)
    if background is not None:
        fig.add_trace(background)
    for trace in _fixed_traces(kind, epochs, baseline, rules):
        fig.add_trace(trace)
    if not shown:
        fig.update_layout(_layout(kind, f"{_TITLES[kind]}: no finished trial yet", shown))
        return fig
    numbers = [t.number for t in shown]
    active = numbers.index(selected) if selected in numbers else 0
    first_slot = len(fig.data)
    for trace in _slot_traces(kind, shown[active]):
        fig.add_trace(trace)
    slots = list(range(first_slot, len(fig.data)))
    buttons = []
    for trial in shown:
        data = _slot_data(kind, trial)
        restyle = {key: [d.get(key, []) for d in data] for key in ("x", "y", "text")}
        buttons.append({"label": trial_label(trial, names), "method": "restyle", "args": [restyle, slots]})
    layout = _layout(kind, _TITLES[kind], drawn, menu=True, limit=rules.total_loss_max)
    layout["updatemenus"] = [
        {
            "type": "dropdown",
            "buttons": buttons,
            "active": active,
            "x": 0.0,
            "xanchor": "left",
            "y": 1.02,
            "yanchor": "bottom",
            "showactive": True,
            "bgcolor": "#e3f2fd",
            "bordercolor": "#90caf9",
            "font": {"size": 12},
            "pad": {"l": 0, "t": 0, "b": 0, "r": 0},
        }
    ]
    fig.update_layout(layout)
    return fig


_STAR_COLORS = ("#ffbf00", "#e377c2", "#17becf", "#bcbd22", "#8c564b", "#7f7f7f")


def pareto_front_figure(
    study: optuna.Study,
    names: Sequence[str],
    trials: Sequence[TrialFacts],
    baseline: StoredBaseline | None = None,
) -> go.Figure:
    """Optuna's Pareto-front plot of the first two objectives, each hand-tuned trial (user attr ``label``)
    as a star of its own in the legend, and the baseline's final val perplexity as a vertical line."""
    fig = optuna.visualization.plot_pareto_front(study, target_names=list(names[:2]))
    # Optuna colours the points by trial number; one colour per group reads faster and shows in the legend
    styles = (("other trials", COLORS["dominated"]), ("Pareto-front trials", COLORS["pareto"]))
    for trace, (name, color) in zip(fig.data, styles, strict=False):
        trace.update(
            name=name,
            showlegend=True,
            marker={"showscale": False, "size": 10, "color": color, "colorscale": None},
        )
    for i, trial in enumerate(t for t in trials if t.label):
        color = _STAR_COLORS[i % len(_STAR_COLORS)]
        if trial.values is not None and len(trial.values) >= 2:
            fig.add_trace(
                go.Scatter(
                    x=[trial.values[0]],
                    y=[trial.values[1]],
                    mode="markers",
                    name=f"★ {trial.label} (trial {trial.number})",
                    marker={"symbol": "star", "size": 17, "color": color, "line": {"color": "#000", "width": 1}},
                    hovertemplate=f"{trial.label}, trial {trial.number}<br>%{{x}}, %{{y}}<extra></extra>",
                )
            )
            continue
        if trial.state == TrialState.PRUNED.name and trial.pruned_epoch is not None:
            why = f"pruned at epoch {trial.pruned_epoch}"
        else:
            why = state_word(trial.state) if trial.state != TrialState.RUNNING.name else "no result yet"
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={"symbol": "star-open", "size": 12, "color": color},
                name=f"☆ {trial.label}: {why}",
            )
        )
    if baseline is not None and names and names[0] == "val_ppl":
        final = next((v for v in reversed(baseline.val_ppl) if v is not None), None)
        if final is not None and math.isfinite(final):
            fig.add_vline(
                x=final,
                line={"color": COLORS["baseline"], "dash": "dot"},
                annotation_text=f"baseline {fmt(final)}",
                annotation_position="top right",
            )
    words = {optuna.study.StudyDirection.MINIMIZE: "lower", optuna.study.StudyDirection.MAXIMIZE: "higher"}
    ways = {words[d] for d in study.directions[:2]}
    better = f"{ways.pop()} is better" if len(ways) == 1 else "see axes"
    fig.update_layout(
        title={"text": f"Pareto front: {better}", "x": 0.01, "y": 0.985, "yanchor": "top", "font": {"size": 15}},
        height=_HEIGHT,
        template="plotly_white",
        legend={"orientation": "h", "yanchor": "top", "y": -0.16, "x": 0, "font": {"size": 11}},
        margin={"l": 60, "r": 20, "t": 40, "b": 110},
    )
    fig.update_xaxes(title={"standoff": 2})
    return fig


def _spectrum_points(trial: TrialFacts) -> list[tuple[list[float], list[float]]]:
    """K's stored eigenvalues at the trial's last epoch with a spectrum, per block: (real parts, imaginary)."""
    re_cols: list[Any] = trial.metric("koopman_k_eig_re")  # one list per epoch
    im_cols: list[Any] = trial.metric("koopman_k_eig_im")
    for re_values, im_values in zip(reversed(re_cols), reversed(im_cols), strict=False):
        if re_values and im_values and len(re_values) == len(im_values):
            per = K_EIGS_PER_BLOCK
            return [
                ([v if v is not None else math.nan for v in re_values[b : b + per]],
                 [v if v is not None else math.nan for v in im_values[b : b + per]])
                for b in range(0, len(re_values), per)
            ]  # fmt: skip
    return []


def spectrum_figure(
    trials: Sequence[TrialFacts], *, selected: int | None = None, names: Sequence[str] = ()
) -> go.Figure:
    """K's eigenvalues per block at a trial's last Koopman epoch on the complex plane, with the unit circle: a
    K whose eigenvalues lie outside it amplifies (iterated, the linear model explodes), as the notebook's DMD
    refit made. One colour per block; a dropdown switches the trial (``selected`` first)."""
    shown = sorted((t for t in trials if _spectrum_points(t)), key=lambda t: t.number)[-MAX_DROPDOWN_TRIALS:]
    theta = [2 * math.pi * i / 120 for i in range(121)]
    fig = go.Figure(
        go.Scatter(
            x=[math.cos(a) for a in theta],
            y=[math.sin(a) for a in theta],
            mode="lines",
            name="|λ| = 1",
            line={"color": COLORS["limit"], "dash": "dash", "width": 1},
            hoverinfo="skip",
        )
    )
    title = "K's eigenvalues per block (last epoch): outside the circle, K amplifies"
    layout: dict[str, Any] = {
        "title": {"text": title, "x": 0.01, "font": {"size": 14}},
        "height": _HEIGHT,
        "template": "plotly_white",
        "xaxis": {"title": {"text": "Re λ"}, "zeroline": True, "tickformat": ".3~g"},
        "yaxis": {"title": {"text": "Im λ"}, "scaleanchor": "x", "scaleratio": 1, "tickformat": ".3~g"},
        "legend": {"orientation": "h", "y": -0.2, "x": 0},
        "margin": {"l": 60, "r": 20, "t": 60, "b": 90},
    }
    if not shown:
        layout["title"]["text"] = "K's eigenvalues: no trial with the Koopman loss on yet"
        fig.update_layout(layout)
        return fig
    numbers = [t.number for t in shown]
    active = numbers.index(selected) if selected in numbers else 0
    blocks = max(len(_spectrum_points(t)) for t in shown)
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
    for b in range(blocks):
        fig.add_trace(
            go.Scatter(
                x=[], y=[], mode="markers", name=f"block {b + 1}",
                marker={"size": 9, "color": palette[b % len(palette)], "line": {"color": "#000", "width": 0.5}},
                hovertemplate=f"block {b + 1}: λ = %{{x:.4g}} %{{y:+.4g}}i<extra></extra>",
            )
        )  # fmt: skip
    slots = list(range(1, 1 + blocks))
    buttons = []
    padded = []
    for trial in shown:
        points = _spectrum_points(trial)
        points += [([], [])] * (blocks - len(points))
        padded.append(points)
        restyle = {"x": [p[0] for p in points], "y": [p[1] for p in points]}
        buttons.append({"label": trial_label(trial, names), "method": "restyle", "args": [restyle, slots]})
    for slot, (xs, ys) in zip(slots, padded[active], strict=True):
        fig.data[slot].x, fig.data[slot].y = xs, ys
    layout["updatemenus"] = [
        {"type": "dropdown", "buttons": buttons, "active": active, "x": 0.0, "xanchor": "left", "y": 1.02,
         "yanchor": "bottom", "bgcolor": "#e3f2fd", "bordercolor": "#90caf9", "font": {"size": 12}}
    ]  # fmt: skip
    layout["title"]["y"] = 0.98
    layout["margin"]["t"] = 80
    fig.update_layout(layout)
    return fig
