"""A study file edited after the study was created, and a study made by something else, are refused."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from koopman_search.search.cli import main

BASE = """[study]
name = "s"
n_trials = 3

[trainer.train]
epochs = 4

[search.koopman_weight_max]
type = "float"
low = 0.01
high = 0.5
log = true

[search.schedule]
type = "categorical"
choices = ["linear", "step"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text, encoding="utf-8")
    return path


def trial_count(tmp_path: Path) -> int:
    return len(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}").get_trials())


@pytest.mark.parametrize(
    ("old", "new", "change"),
    [
        ("high = 0.5", "high = 0.3", "search.koopman_weight_max.high: 0.5 → 0.3"),
        ('choices = ["linear", "step"]', 'choices = ["linear", "cosine"]', "search.schedule.choices"),
        ("epochs = 4", "epochs = 6", "trainer.train.epochs: 4 → 6"),
    ],
)
def test_an_edited_study_file_is_refused_with_its_changes_listed(
    old: str, new: str, change: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write(tmp_path, BASE)
    assert main(["create", str(study)]) == 0
    capsys.readouterr()
    write(tmp_path, BASE.replace(old, new))
    for command in ("create", "launch"):
        assert main([command, str(study)]) == 2
        err = capsys.readouterr().err
        assert "study s was created from another definition than this study file's" in err and change in err
        assert "--redefine" in err
    assert trial_count(tmp_path) == 3  # nothing added


def test_the_same_file_again_and_a_budget_change_are_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write(tmp_path, BASE)
    assert main(["create", str(study)]) == 0
    assert main(["create", str(study)]) == 0
    write(tmp_path, BASE.replace("n_trials = 3", "n_trials = 5"))  # the budget is not the definition
    assert main(["create", str(study)]) == 0
    assert trial_count(tmp_path) == 5


def test_a_study_made_by_plain_optuna_is_not_adopted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    plain.enqueue_trial({"x": 1.0})
    study = write(tmp_path, BASE)
    assert main(["launch", str(study)]) == 2
    err = capsys.readouterr().err
    assert "study s exists in this storage but was not made by koopman-search" in err
    reloaded = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert [t.state.name for t in reloaded.get_trials()] == ["WAITING"] and reloaded.user_attrs == {}
    assert [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 's.db'}")] == ["s"]


def test_a_worker_refuses_an_edited_study_file_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = write(tmp_path, BASE)
    assert main(["create", str(study)]) == 0
    capsys.readouterr()
    write(tmp_path, BASE.replace("high = 0.5", "high = 0.3"))
    assert main(["worker", str(study), "--workers", "2"]) == 2
    assert "search.koopman_weight_max.high: 0.5 → 0.3" in capsys.readouterr().err


def test_redefine_continues_the_study_under_the_files_new_definition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write(tmp_path, BASE)
    assert main(["create", str(study)]) == 0
    write(tmp_path, BASE.replace("high = 0.5", "high = 0.3").replace("n_trials = 3", "n_trials = 4"))
    assert main(["create", str(study), "--redefine"]) == 0
    assert trial_count(tmp_path) == 4
    assert main(["create", str(study)]) == 0  # the new definition is the stored one now
    write(tmp_path, BASE)
    assert main(["create", str(study)]) == 2
    assert "search.koopman_weight_max.high: 0.3 → 0.5" in capsys.readouterr().err
