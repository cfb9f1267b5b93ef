"""A study as one self-contained HTML file: plotly.js embedded once, every figure inline, opens offline.

Sections (in order): summary, best trial or Pareto front, optimization history, parameter importances,
parallel coordinates, per-trial curves, prune reasons, best config. Figures come from Optuna's
``optuna.visualization`` where it has them, and from :mod:`koopman_search.search.review.figures` (stored epoch records)
for the rest. Nothing is re-run and nothing is written to the storage.
"""

from __future__ import annotations

import html
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
import plotly.offline
import plotly.utils
from optuna.trial import FrozenTrial, TrialState

from koopman_search.search.errors import StorageError
from koopman_search.search.review import figures
from koopman_search.search.review.export import dump_toml, trial_config_toml
from koopman_search.search.review.reach import findings
from koopman_search.search.review.stored import (
    StoredBaseline,
    StoredRules,
    TrialFacts,
    objective_directions,
    objective_names,
    read_baseline,
    read_rules,
    trial_facts,
)
from koopman_search.search.review.summary import (
    MIN_TRIALS_FOR_IMPORTANCE,
    StudySummary,
    best_trials,
    fmt,
    fmt_param,
    fmt_seconds,
    summarize,
)
from koopman_search.search.storage.layout import study_attrs
from koopman_search.search.studyfile.space import PARAM_NAMES, PARAM_TO_PATH
from koopman_search.trainer.checkpoint import atomic_write
from koopman_search.trainer.errors import ConfigError, KoopmanError

__all__ = ["SECTION_TITLES", "build_report", "params_toml", "write_report"]

logger = logging.getLogger(__name__)

BestConfig = Callable[[optuna.Study], str]

# id -> heading; "best" reads "Best trial" for one objective and "Pareto front" for several
SECTION_TITLES = {
    "summary": "Summary",
    "best": "Best trial",
    "history": "Optimization history",
    "importances": "Parameter importances",
    "parallel": "Parallel coordinates",
    "curves": "Per-trial curves",
    "spectrum": "K's eigenvalues",
    "pruned": "Prune reasons",
    "config": "Best config",
}
ROUGH_IMPORTANCE_BELOW = 50

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222;
       background: #fafafa; }
header { background: #263238; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #cfd8dc; font-size: 13px; }
nav { background: #eceff1; padding: 8px 32px; position: sticky; top: 0; z-index: 10;
      border-bottom: 1px solid #cfd8dc; font-size: 14px; }
nav a { margin-right: 16px; color: #1565c0; text-decoration: none; }
main { padding: 8px 32px 48px 32px; max-width: 1400px; box-sizing: border-box; }
div.table { overflow-x: auto; }
section { background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; padding: 8px 20px 16px 20px;
          margin: 18px 0; }
h2 { font-size: 19px; border-bottom: 1px solid #eee; padding-bottom: 6px; }
p.lead { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
.grid > div { min-width: 0; }
.note { background: #fff8e1; border-left: 4px solid #ffb300; padding: 8px 12px; margin: 8px 0; }
pre { background: #263238; color: #eceff1; padding: 12px 16px; border-radius: 4px; overflow-x: auto; }
.kpi { display: inline-block; margin: 4px 28px 8px 0; }
.kpi b { display: block; font-size: 22px; }
.kpi span { color: #666; font-size: 12px; }
"""


@dataclass
class _Context:
    study: optuna.Study
    names: list[str]
    directions: list[str]
    rules: StoredRules
    baseline: StoredBaseline | None
    facts: list[TrialFacts]  # every trial
    finished: list[TrialFacts]  # complete, pruned, failed
    best: list[TrialFacts]
    summary: StudySummary


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _figure_html(fig: go.Figure, div_id: str | None = None) -> str:
    return fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        config={"displaylogo": False, "responsive": True},
        default_width="100%",
        div_id=div_id,
    )


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; a column empty in every row is left out (e.g. a label no trial has, a parameter the
    study does not search)."""
    shown = [i for i in range(len(header)) if not rows or any(str(row[i]) != "" for row in rows)]
    head = "".join(f"<th>{_esc(header[i])}</th>" for i in shown)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_esc(row[i])}</td>' if i in numeric else f"<td>{_esc(row[i])}</td>" for i in shown
        )
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _params_text(trial: TrialFacts) -> str:
    return ", ".join(f"{k}={fmt_param(v)}" for k, v in trial.params.items())


def _targets(ctx: _Context) -> list[tuple[Callable[[FrozenTrial], float] | None, str]]:
    """One (target, name) per objective; Optuna wants ``target`` only for multi-objective studies."""
    if len(ctx.names) == 1:
        return [(None, ctx.names[0])]

    def value(i: int) -> Callable[[FrozenTrial], float]:
        return lambda t: t.values[i]

    return [(value(i), name) for i, name in enumerate(ctx.names)]


def _quiet(call: Callable[[], go.Figure]) -> go.Figure:
    """Optuna's plots warn (ExperimentalWarning, "too few trials"); the report says so itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


# ---- sections --------------------------------------------------------------------------------------------


def _summary_section(ctx: _Context) -> str:
    s = ctx.summary
    objectives = ", ".join(f"{d} {n}" for n, d in zip(ctx.names, ctx.directions, strict=False))
    kpis = [
        (s.states_text(), "trials"),
        (f"{s.epochs_spent} epochs", f"trained in {fmt_seconds(s.seconds_spent)} (baseline included)"),
        (f"{s.epochs_from_warmup} epochs", "saved by the shared warmup"),
        (f"{s.epochs_saved_by_rules} epochs", "saved by the prune rules"),
        (f"{s.epochs_saved_by_pruner} epochs", "saved by the pruner"),
    ]
    if ctx.best and ctx.best[0].values:
        best, name = ctx.best[0], ctx.names[0]
        value = best.values[0] if best.values else math.nan
        what = f"best {name} (trial {best.number})"
        final = ctx.baseline.at(len(ctx.baseline.val_ppl)) if ctx.baseline is not None else None
        if name == "val_ppl" and final:
            what += f": {value / final:.2f} × the baseline's {fmt(final)}"
        kpis.insert(1, (fmt(value), what))
    parts = ['<div class="kpis">']
    parts += [f'<div class="kpi"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for v, k in kpis]
    parts.append("</div>")
    rows: list[list[Any]] = [["objectives", objectives]]
    if ctx.rules.total_loss_max is not None or ctx.rules.val_ppl_ratio_max is not None:
        limits = []
        if ctx.rules.total_loss_max is not None:
            limits.append(f"total loss > {fmt(ctx.rules.total_loss_max)}")
        if ctx.rules.val_ppl_ratio_max is not None:
            limits.append(f"val perplexity > {fmt(ctx.rules.val_ppl_ratio_max)} × baseline at the same epoch")
        rows.append(["pruned when", " or ".join(limits) + ", or a metric is NaN"])
    if ctx.baseline is not None:
        known = [v for v in ctx.baseline.val_ppl if v is not None]
        curve = f"{fmt(known[0])} → {fmt(known[-1])}" if known else "no curve"
        rows.append(
            [
                "baseline",
                f"Koopman off, seed {ctx.baseline.seed}, {ctx.baseline.state}: val perplexity {curve} "
                f"over {len(ctx.baseline.val_ppl)} epochs",
            ]
        )
    else:
        rows.append(["baseline", "none stored"])
    rows.append(["compute", s.compute_text()])
    for line in findings(ctx.facts, ctx.rules, ctx.baseline, ctx.best, ctx.names):
        rows.append(["finding", line])
    if ctx.best:
        rows.append(
            [
                "recommendation",
                "koopman-search recommend STUDY.toml (--lang ja in Japanese): the problems found, three options "
                "from the front with their settings and effects, and the success and retune indicators",
            ]
        )
    parts.append(_table(["", ""], rows).replace("<thead><tr><th></th><th></th></tr></thead>", ""))
    return "".join(parts)


def _best_section(ctx: _Context) -> str:
    if not ctx.best:
        return _note("No trial has completed yet, so there is no best trial.")
    parts = []
    if len(ctx.names) >= 2:
        parts.append(
            '<p class="lead">Trials that no other trial beats on both objectives. The hand-tuned options '
            "from the study file are starred; the dotted line is the baseline's final val perplexity.</p>"
        )
        fig = _quiet(lambda: figures.pareto_front_figure(ctx.study, ctx.names, ctx.finished, ctx.baseline))
        parts.append(_figure_html(fig))
    header = ["trial", "label", *ctx.names, "epochs", *PARAM_NAMES]
    rows = []
    for t in ctx.best:
        values = [fmt(v) for v in t.values or ()]
        params = [fmt_param(t.params[p]) if p in t.params else "" for p in PARAM_NAMES]
        rows.append([t.number, t.label or "", *values, t.last_epoch, *params])
    parts.append(_table(header, rows, numeric=(0, *range(2, 3 + len(ctx.names)))))
    return "".join(parts)


def _history_section(ctx: _Context) -> str:
    if ctx.summary.states.get("COMPLETE", 0) == 0:
        return _note("No trial has completed yet: the optimization history needs at least one.")
    parts = ['<div class="grid">']
    for target, name in _targets(ctx):
        plot = optuna.visualization.plot_optimization_history
        fig = _quiet(partial(plot, ctx.study, target=target, target_name=name))
        fig.update_layout(title={"text": f"Optimization history: {name}"}, height=420)
        parts.append(f"<div>{_figure_html(fig)}</div>")
    parts.append("</div>")
    return "".join(parts)


def _searched_params(ctx: _Context) -> list[str]:
    """Parameters that took more than one value among complete trials (a fixed one has no importance)."""
    seen: dict[str, set[str]] = {}
    for t in ctx.facts:
        if t.state == TrialState.COMPLETE.name:
            for k, v in t.params.items():
                seen.setdefault(k, set()).add(repr(v))
    order = [p for p in PARAM_NAMES if p in seen] + [p for p in seen if p not in PARAM_NAMES]
    return [p for p in order if len(seen[p]) > 1]


def _importances_section(ctx: _Context) -> str:
    complete = ctx.summary.states.get("COMPLETE", 0)
    if complete < MIN_TRIALS_FOR_IMPORTANCE:
        return _note(
            f"Not enough trials: parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} complete "
            f"trials, and this study has {complete}."
        )
    params = _searched_params(ctx)
    if not params:
        return _note("Not enough variety: every complete trial has the same parameters.")
    caveat = (
        f"Fitted (fANOVA) on the {complete} complete trials alone; pruned and failed trials are left "
        "out, so settings that get pruned look unimportant. "
    )
    if complete < ROUGH_IMPORTANCE_BELOW:
        caveat += f"Below about {ROUGH_IMPORTANCE_BELOW} trials read them as a rough ranking, not as shares."
    parts = [f'<p class="lead">{_esc(caveat)}</p>', '<div class="grid">']
    for target, name in _targets(ctx):
        try:
            fig = _quiet(
                partial(
                    optuna.visualization.plot_param_importances,
                    ctx.study,
                    params=params,
                    target=target,
                    target_name=name,
                )
            )
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            logger.info("no parameter importances for %s: %s", name, exc)
            parts.append(f"<div>{_note(f'No parameter importances for {name}: {exc}')}</div>")
            continue
        fig.update_layout(title={"text": f"Parameter importances for {name}"}, height=420)
        parts.append(f"<div>{_figure_html(fig)}</div>")
    parts.append("</div>")
    return "".join(parts)


def _parallel_section(ctx: _Context) -> str:
    if ctx.summary.states.get("COMPLETE", 0) == 0:
        return _note("No trial has completed yet: parallel coordinates need at least one.")
    params = [p for p in PARAM_NAMES if any(p in t.params for t in ctx.facts)]
    parts = [
        '<p class="lead">Each line is a complete trial, coloured by the objective (darker is better); '
        "drag along an axis to filter.</p>"
    ]
    for target, name in _targets(ctx):
        fig = _quiet(
            partial(
                optuna.visualization.plot_parallel_coordinate,
                ctx.study,
                params=params or None,
                target=target,
                target_name=name,
            )
        )
        fig.update_layout(title={"text": f"Parallel coordinates, coloured by {name}"}, height=420)
        _drop_repeated_ticks(fig)
        parts.append(_figure_html(fig))
    return "".join(parts)


def _drop_repeated_ticks(fig: go.Figure) -> None:
    """Optuna draws each parallel axis's tick labels as annotations, rounded to 3 digits, so a narrow int
    range gives ``234, 234, 234``: keep the first of each repeated label on an axis."""
    seen: set[tuple[Any, str]] = set()
    kept = []
    for note in fig.layout.annotations:
        key = (note.x, str(note.text))
        if key in seen:
            continue
        seen.add(key)
        kept.append(note)
    fig.layout.annotations = kept


def _curves_section(ctx: _Context) -> str:
    with_records = [t for t in ctx.finished if t.epoch_numbers]
    if not with_records:
        return _note("No finished trial has stored epoch records yet.")
    selected = ctx.best[0].number if ctx.best else None
    parts = [
        '<p class="lead">From the epoch records stored with each trial. Pick a trial in the menu: it switches '
        "all four figures (the best one is shown first); grey lines are all the trials, for comparison. "
        "A red × marks where a trial was pruned; dashed red lines are the prune limits.</p>",
    ]
    # one menu for the four figures: each figure's own dropdown is taken out, and its entries (the
    # restyle of the highlighted traces per trial, the same trials in the same order) are applied together
    menus: dict[str, list[Any]] = {}
    labels: list[str] = []
    active = 0
    grid = ['<div class="grid">']
    for kind in figures.KINDS:
        fig = figures.trial_curves_figure(
            kind, with_records, ctx.baseline, ctx.rules, selected=selected, names=ctx.names
        )
        div_id = f"curves-{kind}"
        if fig.layout.updatemenus:
            menu = fig.layout.updatemenus[0]
            menus[div_id] = [list(b.args) for b in menu.buttons]
            labels = [b.label for b in menu.buttons]
            active = menu.active or 0
            fig.layout.updatemenus = ()
            fig.update_layout(margin={"t": 40})
        grid.append(f"<div>{_figure_html(fig, div_id)}</div>")
    grid.append("</div>")
    if labels:
        options = "".join(
            f'<option value="{i}"{" selected" if i == active else ""}>{_esc(label)}</option>'
            for i, label in enumerate(labels)
        )
        data = json.dumps(menus, cls=plotly.utils.PlotlyJSONEncoder).replace("</", "<\\/")
        parts.append(f'<p><label for="curves-trial">Trial: </label><select id="curves-trial">{options}</select></p>')
        parts += grid
        parts.append(f'<script type="application/json" id="curves-menus">{data}</script>')
        parts.append(
            "<script>(function () {\n"
            '  var menus = JSON.parse(document.getElementById("curves-menus").textContent);\n'
            '  document.getElementById("curves-trial").addEventListener("change", function (e) {\n'
            "    var i = Number(e.target.value);\n"
            "    Object.keys(menus).forEach(function (id) {\n"
            "      var args = menus[id][i];\n"
            "      Plotly.restyle(document.getElementById(id), args[0], args[1]);\n"
            "    });\n"
            "  });\n"
            "})();</script>"
        )
    else:
        parts += grid
    return "".join(parts)


def _spectrum_section(ctx: _Context) -> str:
    with_spectrum = [t for t in ctx.finished if any(t.metric("koopman_k_eig_re"))]
    if not with_spectrum:
        return _note("No finished trial has K's eigenvalues stored (they are recorded from the first Koopman epoch).")
    selected = ctx.best[0].number if ctx.best else None
    spectrum = figures.spectrum_figure(with_spectrum, selected=selected, names=ctx.names)
    lead = (
        "K's largest eigenvalues per block at each trial's last epoch (pick a trial in the figure's menu): "
        "outside the dashed unit circle K amplifies, and a linear model iterated from it explodes, as the "
        "notebook's DMD refit made."
    )
    return f'<p class="lead">{_esc(lead)}</p>' + _figure_html(spectrum, "k-spectrum")


def _pruned_section(ctx: _Context) -> str:
    pruned = [t for t in ctx.finished if t.state == TrialState.PRUNED.name]
    failed = [t for t in ctx.finished if t.state == TrialState.FAIL.name]
    parts = []
    if pruned:
        rows = [
            [
                t.number,
                t.label or "",
                t.pruned_epoch if t.pruned_epoch is not None else "n/a",
                t.prune_reason or "no reason stored",
                t.epochs_saved_by_pruning,
                _params_text(t),
            ]
            for t in pruned
        ]
        parts.append(_table(["trial", "label", "epoch", "reason", "epochs saved", "params"], rows, numeric=(0, 2, 4)))
    else:
        parts.append(_note("No trial was pruned."))
    if failed:
        parts.append("<h3>Failed trials</h3>")
        rows = [[t.number, t.label or "", t.fail_reason or "no reason stored", _params_text(t)] for t in failed]
        parts.append(_table(["trial", "label", "error", "params"], rows, numeric=(0,)))
    return "".join(parts)


def params_toml(study: optuna.Study, trial: TrialFacts, names: Sequence[str]) -> str:
    """The trial's parameters as the trainer config's TOML tables (``[koopman] weight_max = ...``)."""
    results = ", ".join(f"{n} = {fmt(v)}" for n, v in zip(names, trial.values or (), strict=False))
    header = (
        f"Best trial {trial.number} of study {study.study_name!r}" + (f" ({results})" if results else "") + "\n"
        "Its searched settings in the trainer config; everything else as in the study's trainer config."
    )
    tables: dict[str, dict[str, Any]] = {}
    for name, value in trial.params.items():
        section, _, key = PARAM_TO_PATH.get(name, f"search.{name}").partition(".")
        tables.setdefault(section, {})[key] = value
    return dump_toml(tables, header)


def _config_section(ctx: _Context, best_config: BestConfig | None) -> str:
    if not ctx.best:
        return _note("No trial has completed yet, so there is no config to export.")
    best = ctx.best[0]
    which = (
        f"trial {best.number}, the best"
        if len(ctx.names) == 1
        else f"trial {best.number}, the Pareto-front trial with the best {ctx.names[0]}"
    )
    if best_config is not None:
        text = best_config(ctx.study)
    else:
        try:
            frozen = next(t for t in ctx.study.get_trials(deepcopy=False) if t.number == best.number)
            text = trial_config_toml(ctx.study, frozen)
        except (StorageError, ConfigError) as exc:  # a study without a stored study file
            logger.info("best config: %s; showing the trial's parameters only", exc)
            text = params_toml(ctx.study, best, ctx.names)
    return (
        f'<p class="lead">The trainer config of {_esc(which)}. Save it as best.toml and run '
        "<code>koopman-search train --config best.toml</code> (or get it with "
        "<code>koopman-search best STUDY.toml --format toml</code>).</p>"
        f"<pre>{_esc(text)}</pre>"
    )


# ---- the page ----------------------------------------------------------------------------------------


def _context(study: optuna.Study) -> _Context:
    trials = study.get_trials(deepcopy=False)
    facts = [trial_facts(t) for t in trials]
    attrs = study_attrs(study)
    baseline = read_baseline(attrs)
    finished_states = {TrialState.COMPLETE.name, TrialState.PRUNED.name, TrialState.FAIL.name}
    return _Context(
        study=study,
        names=objective_names(study),
        directions=objective_directions(study),
        rules=read_rules(attrs),
        baseline=baseline,
        facts=facts,
        finished=[f for f in facts if f.state in finished_states],
        best=best_trials(study),
        summary=summarize(facts, baseline),
    )


def build_report(study: optuna.Study, *, best_config: BestConfig | None = None, now: datetime | None = None) -> str:
    """The report of ``study`` as one HTML string (about 5 MB: plotly.js is inside).

    ``best_config(study)`` renders the exported best config as TOML; by default the best trial's full
    trainer config (:func:`search.review.export.trial_config_toml`), or only its parameters when the study
    holds no study file."""
    ctx = _context(study)
    now = now or datetime.now(timezone.utc)
    titles = dict(SECTION_TITLES)
    if len(ctx.names) >= 2:
        titles["best"] = "Pareto front"
    builders: dict[str, Callable[[], str]] = {
        "summary": lambda: _summary_section(ctx),
        "best": lambda: _best_section(ctx),
        "history": lambda: _history_section(ctx),
        "importances": lambda: _importances_section(ctx),
        "parallel": lambda: _parallel_section(ctx),
        "curves": lambda: _curves_section(ctx),
        "spectrum": lambda: _spectrum_section(ctx),
        "pruned": lambda: _pruned_section(ctx),
        "config": lambda: _config_section(ctx, best_config),
    }
    sections = []
    for key, build in builders.items():
        logger.info("report: %s", titles[key].lower())
        sections.append(f'<section id="{key}"><h2>{_esc(titles[key])}</h2>{build()}</section>')
    nav = "".join(f'<a href="#{k}">{_esc(v)}</a>' for k, v in titles.items())
    subtitle = (
        f"koopman-search report · {len(ctx.facts)} trials · "
        f"generated {now.astimezone(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(study.study_name)}: koopman-search report</title>\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<style>{_CSS}</style>\n"
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>\n'
        "</head>\n<body>\n"
        f"<header><h1>Study {_esc(study.study_name)}</h1><p>{_esc(subtitle)}</p></header>\n"
        f"<nav>{nav}</nav>\n<main>\n" + "\n".join(sections) + "\n</main>\n</body>\n</html>\n"
    )


def write_report(study: optuna.Study, out: str | Path, *, best_config: BestConfig | None = None) -> Path:
    """Build the report and write it to ``out`` atomically (a temp file beside it, then a rename)."""
    out = Path(out)
    text = build_report(study, best_config=best_config)
    try:
        atomic_write(out, lambda fh: fh.write(text.encode("utf-8")), parents=False)
    except OSError as exc:
        raise KoopmanError(f"could not write the report, but got out={out}: {exc.strerror}") from exc
    logger.info("wrote %s (%.1f MB)", out, len(text) / 1e6)
    return out
