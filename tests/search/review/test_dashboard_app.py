"""The dashboard's study list and importances as koopman-search serves them (search/review/dashboard_app.py),
through a real server on a free loopback port."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

from koopman_search.search.review.dashboard_app import list_label, order_studies
from koopman_search.search.storage.layout import BASELINE_ROLE_PREFIX, ROLE_ATTR
from tests.search.review.synthetic import dashboard_at

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(url: str, name: str, complete: int) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=url, directions=["minimize", "minimize"])
    for i in range(complete):
        trial = study.ask(
            {"a": optuna.distributions.FloatDistribution(0, 1), "b": optuna.distributions.IntDistribution(1, 9)}
        )
        study.tell(trial, [trial.params["a"] + 0.01 * i, trial.params["b"] * 1.0])
    return study


def _companion(url: str, owner: str) -> optuna.Study:
    study = optuna.create_study(study_name=f"{owner}.baseline-seed0", storage=url)
    study.set_user_attr(ROLE_ATTR, BASELINE_ROLE_PREFIX + owner)
    return study


@pytest.fixture
def base(tmp_path: Path) -> Iterator[tuple[str, str]]:
    url = f"sqlite:///{tmp_path / 'list.db'}"
    with dashboard_at(url) as address:
        yield address, url


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_each_baseline_companion_is_listed_right_after_its_study_and_named_as_such(base: tuple[str, str]) -> None:
    address, url = base
    _study(url, "first", 0)
    _study(url, "second", 0)
    _companion(url, "first")  # created after both studies: the dashboard would list it first
    _companion(url, "second")
    lone = optuna.create_study(study_name="gone.baseline-seed0", storage=url)  # its study was deleted
    lone.set_user_attr(ROLE_ATTR, BASELINE_ROLE_PREFIX + "gone")
    names = [s["study_name"] for s in _get(f"{address}/api/studies")["study_summaries"]]
    # the dashboard shows this list reversed (newest first): second, its baseline, first, its baseline
    assert list(reversed(names)) == [
        "gone.baseline-seed0",
        "second",
        "second.baseline-seed0 (baseline of second, not a search)",
        "first",
        "first.baseline-seed0 (baseline of first, not a search)",
    ]


def test_order_studies_keeps_studies_without_companions_as_they_are() -> None:
    summaries = [{"study_name": n, "user_attrs": [{"key": "x", "value": "1"}]} for n in ("a", "b", "c")]
    assert order_studies(summaries) == summaries
    assert list_label("a.baseline-seed3", "a") == "a.baseline-seed3 (baseline of a, not a search)"


def test_importances_are_empty_under_ten_complete_trials_and_fitted_from_ten(base: tuple[str, str]) -> None:
    address, url = base
    few = _study(url, "few", 9)
    many = _study(url, "many", 10)
    few_answer = _get(f"{address}/api/studies/{few._study_id}/param_importances")
    assert few_answer == {"param_importances": [[], []]}
    many_answer = _get(f"{address}/api/studies/{many._study_id}/param_importances")["param_importances"]
    assert len(many_answer) == 2 and all({i["name"] for i in objective} == {"a", "b"} for objective in many_answer)


def test_a_missing_study_is_still_the_dashboards_404(base: tuple[str, str]) -> None:
    address, _ = base
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{address}/api/studies/999/param_importances", timeout=30)
    assert caught.value.code == 404
