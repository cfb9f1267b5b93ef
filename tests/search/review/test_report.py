"""The static HTML report."""

from __future__ import annotations

import html
import re
from pathlib import Path

import optuna
import tomllib
from optuna.trial import TrialState

from search.review import (
    build_report,
    params_toml,
    trial_facts,
    write_report,
)
from search.review.report import SECTION_TITLES
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
    headings = re.findall(r"<h2>([^<]+)</h2>", text)
    expected = [("Pareto front" if k == "best" else v) for k, v in SECTION_TITLES.items()]
    assert headings == expected
    assert len(PLOTLY_HEADER.findall(text)) == 1
    assert "<script src=" not in text and "<link " not in text  # nothing to fetch: opens offline
    assert text.count('class="plotly-graph-div"') >= 9  # pareto, 2 histories, 2 importances, 2 parallel, 3 curves


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
    pruned = sum(f.epochs_saved_by_pruning for f in facts)
    text = build_report(study)
    section = text.split('<section id="summary">', 1)[1].split("</section>", 1)[0]
    assert "6 complete, 2 pruned, 1 failed" in section
    assert f"<b>{spent} epochs</b>" in section
    assert f"<b>{warmup} epochs</b><span>saved by the shared warmup" in section
    assert f"<b>{pruned} epochs</b><span>saved by pruning" in section
    best = min(study.best_trials, key=lambda t: t.values[0])
    ratio = best.values[0] / BASELINE_VAL_PPL[-1]
    kpi = f"best val_ppl (trial {best.number}): {ratio:.2f} × the baseline's 477.2"
    assert f"<b>{best.values[0]:.5g}</b><span>{html.escape(kpi)}</span>" in section


def test_report_of_a_study_with_one_complete_trial_says_importances_need_more(storage_url: str) -> None:
    study = make_review_study(storage_url, plans=[PLANS[0], PLANS[3]])
    text = build_report(study)
    section = text.split('<section id="importances">', 1)[1].split("</section>", 1)[0]
    assert "Not enough trials: parameter importances need at least 2 complete trials, and this study has 1." in section
    assert "Pareto front" in text


def test_report_of_a_study_without_trials_explains_each_empty_section(tmp_path: Path) -> None:
    study = make_review_study(f"sqlite:///{tmp_path / 'empty.db'}", plans=[])
    text = build_report(study)
    assert "No trial has completed yet" in text and "No trial was pruned." in text
    assert len(PLOTLY_HEADER.findall(text)) == 1


def test_report_of_a_single_objective_study_shows_the_best_trial(tmp_path: Path) -> None:
    study = make_review_study(f"sqlite:///{tmp_path / 'one.db'}", objectives=["val_ppl"])
    text = build_report(study)
    headings = re.findall(r"<h2>([^<]+)</h2>", text)
    assert headings == list(SECTION_TITLES.values())  # "Best trial", not "Pareto front"
    best = study.best_trial
    section = text.split('<section id="best">', 1)[1].split("</section>", 1)[0]
    assert f'<td class="num">{best.number}</td>' in section and f"{best.value:.5g}" in section
    assert "Optimization history: val_ppl" in text


def test_best_config_is_toml_with_the_trainer_config_tables(study: optuna.Study) -> None:
    from search.review.summary import best_trials

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
    from search.review.summary import best_trials

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
