"""The static HTML report."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import optuna
import plotly.graph_objects as go
import pytest
import tomllib
from optuna.trial import TrialState

from koopman_search.search.review import (
    build_report,
    params_toml,
    trial_facts,
    write_report,
)
from koopman_search.search.review import report as report_module
from koopman_search.search.review.report import SECTION_TITLES
from koopman_search.search.storage.layout import trial_attrs
from tests.search.review.synthetic import (
    BASELINE_VAL_PPL,
    EPOCHS,
    PLANS,
    STUDY_NAME,
    make_review_study,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- report -------------------------------------------------------------------------------------------------

PLOTLY_HEADER = re.compile(r"\* plotly\.js v\d+\.\d+\.\d+")


def test_report_has_every_section_and_embeds_plotly_js_once(study: optuna.Study) -> None:
    text = build_report(study)
    headings = [html.unescape(h) for h in re.findall(r"<h2>([^<]+)</h2>", text)]
    expected = [("Pareto front" if k == "best" else v) for k, v in SECTION_TITLES.items()]
    assert headings == expected
    assert len(PLOTLY_HEADER.findall(text)) == 1
    assert "<script src=" not in text and "<link " not in text  # nothing to fetch: opens offline
    # pareto, 2 histories, 2 parallel, 3 curves, K's spectrum (importances need 10 complete trials; this has 6)
    assert text.count('class="plotly-graph-div"') >= 9
    assert 'id="k-spectrum"' in text


def test_report_tables_list_the_prune_reasons_and_failures(study: optuna.Study) -> None:
    text = build_report(study)
    section = text.split('<section id="pruned">', 1)[1].split("</section>", 1)[0]
    for trial in study.get_trials(states=(TrialState.PRUNED,)):
        reason = trial.user_attrs["prune_reason"]
        assert f'<td class="num">{trial.number}</td>' in section
        assert reason.replace(">", "&gt;") in section
    assert "CUDA out of memory" in section


def test_report_summary_counts_compute_spent_and_saved(study: optuna.Study) -> None:
    facts = [trial_facts(t) for t in study.get_trials()]
    spent = sum(f.epochs_run for f in facts) + EPOCHS
    warmup = sum(f.epochs_from_warmup for f in facts)
    by_rules = sum(f.epochs_saved_by_rules for f in facts)
    assert by_rules == sum(f.epochs_saved_by_pruning for f in facts) > 0  # the demo's prunes are the rules'
    assert all(f.epochs_saved_by_pruner == 0 for f in facts)
    text = build_report(study)
    section = text.split('<section id="summary">', 1)[1].split("</section>", 1)[0]
    assert "6 complete, 2 pruned, 1 failed" in section
    assert f"<b>{spent} epochs</b>" in section
    assert f"<b>{warmup} epochs</b><span>saved by the shared warmup" in section
    assert f"<b>{by_rules} epochs</b><span>saved by the prune rules" in section
    assert "<b>0 epochs</b><span>saved by the pruner" in section
    best = min(study.best_trials, key=lambda t: t.values[0])
    ratio = best.values[0] / BASELINE_VAL_PPL[-1]
    kpi = f"best val_ppl (trial {best.number}): {ratio:.2f} × the baseline's 477.2"
    assert f"<b>{best.values[0]:.5g}</b><span>{html.escape(kpi)}</span>" in section


def test_report_of_a_study_with_one_complete_trial_says_importances_need_more(storage_url: str) -> None:
    study = make_review_study(storage_url, plans=[PLANS[0], PLANS[3]])
    text = build_report(study)
    section = text.split('<section id="importances">', 1)[1].split("</section>", 1)[0]
    assert "Not enough trials: parameter importances need at least 10 complete trials, and this study has 1." in section
    assert "Pareto front" in text


def test_report_of_a_study_without_trials_explains_each_empty_section(tmp_path: Path) -> None:
    study = make_review_study(f"sqlite:///{tmp_path / 'empty.db'}", plans=[])
    text = build_report(study)
    assert "No trial has completed yet" in text and "No trial was pruned." in text
    assert len(PLOTLY_HEADER.findall(text)) == 1


def test_report_of_a_single_objective_study_shows_the_best_trial(tmp_path: Path) -> None:
    study = make_review_study(f"sqlite:///{tmp_path / 'one.db'}", objectives=["val_ppl"])
    text = build_report(study)
    headings = [html.unescape(h) for h in re.findall(r"<h2>([^<]+)</h2>", text)]
    assert headings == list(SECTION_TITLES.values())  # "Best trial", not "Pareto front"
    best = study.best_trial
    section = text.split('<section id="best">', 1)[1].split("</section>", 1)[0]
    assert f'<td class="num">{best.number}</td>' in section and f"{best.value:.5g}" in section
    assert "Optimization history: val_ppl" in text


def test_best_config_is_toml_with_the_trainer_config_tables(study: optuna.Study) -> None:
    from koopman_search.search.review.summary import best_trials

    best = best_trials(study)[0]
    text = params_toml(study, best, ["val_ppl", "val_koopman_nre"])
    parsed = tomllib.loads(text)
    assert parsed["koopman"] == {
        "weight_max": best.params["koopman_weight_max"],
        "start_epoch": best.params["koopman_start_epoch"],
        "fallback_threshold": best.params["fallback_threshold"],
        "schedule": best.params["schedule"],
        "dim": best.params["koopman_dim"],
    }
    assert f"# Best trial {best.number}" in text


def test_report_exports_the_best_trials_full_trainer_config(study: optuna.Study) -> None:
    from koopman_search.search.review.summary import best_trials

    best = best_trials(study)[0]
    text = build_report(study)
    section = text.split('<section id="config">', 1)[1].split("</section>", 1)[0]
    toml_text = html.unescape(section.split("<pre>", 1)[1].split("</pre>", 1)[0])
    config = tomllib.loads(toml_text)
    assert config["koopman"]["weight_max"] == best.params["koopman_weight_max"]
    assert config["koopman"]["schedule"] == best.params["schedule"]
    assert config["train"]["epochs"] == EPOCHS  # the rest comes from the stored study file


def test_report_uses_the_given_best_config_renderer(study: optuna.Study) -> None:
    text = build_report(study, best_config=lambda s: f"# exported from {s.study_name}\n[koopman]\ndim = 128\n")
    assert f"# exported from {STUDY_NAME}" in text


def test_write_report_replaces_the_file_in_one_step(study: optuna.Study, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("old")
    write_report(study, out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "review-demo.db"]


def test_importances_come_with_a_caveat_naming_what_they_were_fitted_on(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report_module, "MIN_TRIALS_FOR_IMPORTANCE", 2)
    section = build_report(study).split('<section id="importances">', 1)[1].split("</section>", 1)[0]
    assert "Fitted (fANOVA) on the 6 complete trials alone; pruned and failed trials are left out" in section
    assert "Below about 50 trials read them as a rough ranking, not as shares." in section
    assert section.count('class="plotly-graph-div"') == 2


def test_the_four_curve_figures_share_one_trial_menu(study: optuna.Study) -> None:
    section = build_report(study).split('<section id="curves">', 1)[1].split("</section>", 1)[0]
    assert section.count("<select") == 1
    options = re.findall(r'<option value="(\d+)"( selected)?>([^<]+)</option>', section)
    with_records = [t for t in study.get_trials() if trial_attrs(t).get("records")]
    assert len(options) == len(with_records) and sum(1 for o in options if o[1]) == 1
    menus = json.loads(re.search(r'<script type="application/json" id="curves-menus">(.*?)</script>', section).group(1))
    assert sorted(menus) == ["curves-linearity", "curves-losses", "curves-val_ppl", "curves-weight"]
    assert all(len(entries) == len(options) for entries in menus.values())
    assert '"buttons"' not in section  # no per-figure menus left


def test_parallel_coordinates_show_each_tick_label_once_per_axis() -> None:
    fig = go.Figure()
    for x, text in [(1, "234"), (1, "234"), (1, "235"), (2, "234")]:
        fig.add_annotation(x=x, y=0, text=text)
    report_module._drop_repeated_ticks(fig)
    assert [(a.x, a.text) for a in fig.layout.annotations] == [(1, "234"), (1, "235"), (2, "234")]
