"""``koopman-search recommend`` (search/review/recommend.py, recommend_text.py, search/cli/recommend.py): the
options and their numbers against ``status``, the knee on a hand-computed front, indicators that fail on a
study built to fail them, and the same numbers in English and in Japanese."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest

from koopman_search.search.review.recommend import Check, _pick, recommendation
from koopman_search.search.review.recommend_text import TEXT, render
from koopman_search.search.review.status import status_data
from koopman_search.search.review.stored import TrialFacts
from koopman_search.search.review.summary import fmt
from koopman_search.trainer.config import config_from_dict
from tests.search.review.synthetic import STUDY_NAME, Plan, make_review_study
from tests.search.study_files import cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NUMBER = re.compile(r"[-+]?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?%?")


def markdown(study: optuna.Study, lang: str = "en") -> str:
    from koopman_search.search.review.export import trial_config_toml

    rec = recommendation(study)
    frozen = study.get_trials(deepcopy=False)
    return render(rec, {o.trial.number: trial_config_toml(study, frozen[o.trial.number]) for o in rec.options}, lang)


def test_three_options_from_the_front_with_the_numbers_status_shows(study: optuna.Study) -> None:
    rec = recommendation(study)
    data = status_data(study)
    by_number = {t["number"]: t for t in data["trials"]}
    front = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    assert [o.kind for o in rec.options] == ["conservative", "balanced", "aggressive"]
    assert len({o.trial.number for o in rec.options}) == 3
    lowest_ppl = min(front, key=lambda t: t["values"]["val_ppl"])
    lowest_nre = min(front, key=lambda t: t["values"]["val_linear_nre"])
    assert rec.options[0].trial.number == lowest_ppl["number"]
    assert rec.options[2].trial.number == lowest_nre["number"]
    text = markdown(study)
    for option in rec.options:
        shown = by_number[option.trial.number]["values"]
        assert option.values == shown
        for metric, value in shown.items():
            assert f"{metric} {fmt(value)} against the baseline's" in text


def facts(number: int, values: tuple[float, float]) -> TrialFacts:
    return TrialFacts(number, number, "COMPLETE", {}, values, None)


def test_the_knee_is_the_trial_nearest_the_ideal_point_of_the_scaled_front() -> None:
    # scaled over the front: (0, 1), (0.2, 0.333), (0.4, 0.222), (1, 0): distances 1, 0.389, 0.457, 1
    front = [facts(0, (1.0, 10.0)), facts(1, (2.0, 4.0)), facts(2, (3.0, 3.0)), facts(3, (6.0, 1.0))]
    picked = {kind: t.number for kind, t in _pick(front, ["minimize", "minimize"])}
    assert picked == {"conservative": 0, "balanced": 1, "aggressive": 3}
    # a maximised second objective turns the front around
    flipped = [facts(0, (1.0, 1.0)), facts(1, (2.0, 7.0)), facts(2, (6.0, 10.0))]
    assert {k: t.number for k, t in _pick(flipped, ["minimize", "maximize"])} == {
        "conservative": 0,
        "balanced": 1,
        "aggressive": 2,
    }
    assert [k for k, _ in _pick(front[:1], ["minimize", "minimize"])] == ["conservative"]


def checks_by_key(checks: list[Check]) -> dict[str, Check]:
    return {c.key: c for c in checks}


def test_indicators_pass_and_fail_as_the_records_say(tmp_path: Path) -> None:
    # weight 0.4 lifts the LM loss 2.6% over the baseline's; the Koopman loss grows 1.3× per epoch; the
    # threshold 20 never cuts; the last total loss ends between 6.5 and 7.0
    bad = Plan(0.4, 5, 20.0, "linear", 128, 0.5, 1.3, 1.05, label="built to fail")
    study = make_review_study(f"sqlite:///{tmp_path / 'bad.db'}", plans=[bad])
    (option,) = {o.trial.number: o for o in recommendation(study).options}.values()
    checks = checks_by_key(option.checks)
    assert checks["success_total"].passed is False and 6.5 < (checks["success_total"].value or 0) < 7.0
    assert checks["retune_total"].passed is True
    assert checks["ppl_ratio"].passed is True
    assert checks["lm_stable"].passed is False
    assert checks["lm_stable"].value == pytest.approx(0.4 * 0.4 / 6.164, rel=1e-3)
    assert checks["koopman_falling"].passed is False
    assert checks["warnings"].passed is True and checks["warnings"].value == 0
    text = markdown(study)
    assert "fallback_threshold did nothing" in text
    good = Plan(0.05, 4, 8.0, "linear", 128, 3.1, 0.78, 1.02)
    fine = recommendation(make_review_study(f"sqlite:///{tmp_path / 'good.db'}", plans=[good])).options[0]
    assert checks_by_key(fine.checks)["koopman_falling"].passed is True
    assert checks_by_key(fine.checks)["lm_stable"].passed is True


def test_the_templates_hold_no_number_of_their_own() -> None:
    # every number in a report comes from the study, so the two languages can be compared number by number
    assert TEXT["en"].keys() == TEXT["ja"].keys()
    assert not [(lang, k) for lang, words in TEXT.items() for k, v in words.items() if re.search("[0-9]", v)]


def test_english_and_japanese_hold_the_same_numbers(study: optuna.Study) -> None:
    en, ja = markdown(study, "en"), markdown(study, "ja")
    assert "# 探索結果の報告" in ja and "保守的な案" in ja and "成功と再調整の指標" in ja
    assert Counter(NUMBER.findall(en)) == Counter(NUMBER.findall(ja))
    assert len(NUMBER.findall(en)) > 100


def test_each_options_toml_is_the_trials_trainer_config(study: optuna.Study) -> None:
    from koopman_search.search.review.export import trial_config

    text = markdown(study)
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    rec = recommendation(study)
    assert len(blocks) == len(rec.options) == 3
    frozen = study.get_trials(deepcopy=False)
    for block, option in zip(blocks, rec.options, strict=True):
        parsed = config_from_dict(tomllib.loads(block), origin="recommendation")
        assert parsed == trial_config(study, frozen[option.trial.number])


def test_cli_writes_the_file_and_refuses_the_studys_own_database(
    study: optuna.Study, storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--study-name", STUDY_NAME, "--storage", storage_url]
    out = tmp_path / "ja.md"
    code, _, err = cli(capsys, "recommend", *target, "--lang", "ja", "--out", str(out))
    assert code == 0, err
    assert out.read_text(encoding="utf-8") == markdown(study, "ja")
    db = storage_url.removeprefix("sqlite:///")
    before = Path(db).read_bytes()
    code, _, err = cli(capsys, "recommend", *target, "--out", db)
    assert code == 2 and "--out must not replace the study's database" in err
    assert Path(db).read_bytes() == before


def test_cli_on_a_study_without_a_complete_trial_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    make_review_study(url, plans=[])
    code, out, err = cli(capsys, "recommend", "--study-name", STUDY_NAME, "--storage", url)
    assert code == 1 and out == ""
    assert "has no complete trial yet; nothing to recommend" in err


def test_the_study_note_and_the_report_point_to_the_recommendation(study: optuna.Study) -> None:
    from koopman_search.search.review.dashboard import annotate_study
    from koopman_search.search.review.report import build_report
    from koopman_search.search.storage.optuna_private import storage_of, study_id_of

    annotate_study(study)
    from optuna_dashboard._note import get_note_from_system_attrs  # the dashboard's own reader

    note = get_note_from_system_attrs(storage_of(study).get_study_system_attrs(study_id_of(study)), None)["body"]
    assert "koopman-search recommend STUDY.toml" in note
    assert "koopman-search recommend STUDY.toml" in build_report(study)
