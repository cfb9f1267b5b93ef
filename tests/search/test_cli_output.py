"""What the data commands print: --version, -f table|json|csv|yaml, one trial shape, the README's parameter
order, --trial with every format, which trial of a front `best` exports and why, and never creating a
storage for a path that does not exist."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from koopman_search.search.cli import main
from koopman_search.search.studyfile.space import PARAM_NAMES
from tests.search.study_files import cli, error_lines, logging_restored, write_study


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("KOOPMAN_ARTIFACTS", raising=False)
    with logging_restored():
        yield


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-objective tiny study of 4 trials (a fixed baseline: no baseline run)."""
    path = write_study(tmp_path_factory.mktemp("output"), n_trials=4, epochs=2, steps=2, baseline=[1e4, 1e4])
    with logging_restored(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["launch", str(path)]) == 0
    return path


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def test_version_names_the_program_and_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("koopman-search ") and out.split()[1][0].isdigit()


def test_status_and_best_give_a_trial_in_one_shape_with_values_keyed_by_metric(
    study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_json(capsys, "status", str(study), "-f", "json")
    best = run_json(capsys, "best", str(study), "--format", "json")
    by_number = {t["number"]: t for t in status["trials"]}
    assert best["objectives"] == status["objectives"] == ["val_ppl", "val_koopman_nre"]
    assert best["pareto_front"]
    for t in status["trials"]:
        assert list(t["values"]) == ["val_ppl", "val_koopman_nre"]
    for row in best["pareto_front"]:
        assert row == by_number[row["number"]]  # the very same object as status gives
    assert best["chosen"]["number"] == best["pareto_front"][0]["number"]
    assert "Pareto front" in best["chosen"]["why"]


def test_yaml_is_the_json_data_and_csv_has_one_row_per_trial_with_params_in_the_readme_order(
    study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = run_json(capsys, "status", str(study), "-f", "json")
    code, out, err = cli(capsys, "status", str(study), "-f", "yaml")
    assert code == 0, err
    assert yaml.safe_load(out) == data
    code, out, err = cli(capsys, "status", str(study), "-f", "csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["number"]) for r in rows] == [t["number"] for t in data["trials"]]
    header = out.splitlines()[0].split(",")
    params = [c for c in header if c.startswith("params.")]
    assert params == [f"params.{p}" for p in PARAM_NAMES if f"params.{p}" in params] and len(params) == 5
    assert header[: header.index(params[0])] == ["number", "state", "label"]
    first = data["trials"][0]
    assert float(rows[0]["values.val_ppl"]) == pytest.approx(first["values"]["val_ppl"])
    assert rows[0]["params.schedule"] == first["params"]["schedule"]


def test_status_and_best_tables_share_the_readme_parameter_order_and_full_names_on_request(
    study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = ["w_max", "start", "thresh", "schedule", "dim"]
    for command in ("status", "best"):
        code, out, err = cli(capsys, command, str(study))
        assert code == 0, err
        header = next(line for line in out.splitlines() if line.startswith("#"))
        assert header.split()[header.split().index("w_max") :][:5] == short
        assert "parameters: w_max = koopman_weight_max, start = koopman_start_epoch" in out
        code, out, err = cli(capsys, command, str(study), "--full-names")
        assert code == 0, err
        header = next(line for line in out.splitlines() if line.startswith("#"))
        first = header.split().index("koopman_weight_max")
        assert header.split()[first : first + 5] == list(PARAM_NAMES[:5])


def test_best_says_which_trial_of_the_front_it_exports_and_why(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    front = run_json(capsys, "best", str(study), "-f", "json")["pareto_front"]
    lowest = min(front, key=lambda t: (t["values"]["val_ppl"], t["number"]))["number"]
    code, out, err = cli(capsys, "best", str(study), "-f", "toml")
    assert code == 0, err
    why = f"trial {lowest}: of the {len(front)} trial(s) on the Pareto front"
    assert out.splitlines()[0].startswith(f"# exported: {why}")
    assert f"exported {why}" in err and "the lowest val_ppl, the first objective" in err
    assert "export another with --trial N" in err
    code, out, err = cli(capsys, "best", str(study))
    assert f"--format toml exports {why}" in out
    assert f"→{lowest} " in out and "(→)" in out  # the exported row is marked, and the mark explained


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "yaml", "toml"])
def test_best_trial_n_shows_or_exports_that_trial_in_every_format(
    fmt: str, study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_json(capsys, "status", str(study), "-f", "json")
    front = {t["number"] for t in run_json(capsys, "best", str(study), "-f", "json")["pareto_front"]}
    n = max(status["trials"], key=lambda t: (t["number"] not in front, t["number"]))["number"]
    code, out, err = cli(capsys, "best", str(study), "--trial", str(n), "-f", fmt)
    assert code == 0, err
    if fmt == "table":
        assert out.startswith(f"trial {n} of study tiny:")
        assert [line.split()[0] for line in out.splitlines()[3:4]] == [str(n)]
    elif fmt in ("json", "yaml"):
        data = json.loads(out) if fmt == "json" else yaml.safe_load(out)
        assert data["trials"] == [status["trials"][n]]
        assert data["chosen"] == {"number": n, "why": f"trial {n}, as asked with --trial {n}"}
    elif fmt == "csv":
        assert [r["number"] for r in csv.DictReader(io.StringIO(out))] == [str(n)]
    else:
        assert f"# koopman-search: trial {n} of study tiny" in out


def test_best_trial_that_does_not_exist_is_an_error_naming_it(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "best", str(study), "--trial", "99", "-f", "json")
    assert code == 1 and out == ""
    [line] = error_lines(err, "best")
    assert "has no trial 99, but got --trial 99; its trials are numbered 0..3" in line


@pytest.mark.parametrize("command", ["status", "best"])
def test_review_of_a_missing_storage_refuses_and_creates_nothing(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "study.db"
    code, out, err = cli(capsys, command, "--study-name", "tiny", "--storage", f"sqlite:///{missing}")
    assert code == 2 and out == ""  # bad input
    [line] = error_lines(err, command)
    assert f"storage file must exist, but got storage='sqlite:///{missing}'" in line
    assert not (tmp_path / "no").exists()
    study = write_study(tmp_path / "fresh")  # its default storage, fresh/study.db, does not exist yet
    code, out, err = cli(capsys, command, str(study))
    assert code == 2
    assert "storage file must exist" in err
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["study.toml"]


def test_optunas_own_log_lines_come_in_the_same_format_as_ours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "create", str(write_study(tmp_path)))
    assert code == 0, err
    assert re.search(
        r"^\d\d:\d\d:\d\d INFO optuna\.[\w.]+: A new study created in RDB with name: tiny$", err, re.MULTILINE
    )
    assert "[I 20" not in err


def shows(text: str, word: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(word)}(?!\S)", text) is not None


def test_one_number_everywhere_the_launch_line_status_best_and_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from koopman_search.search.text import number

    path = write_study(tmp_path, name="numbers", n_trials=2, epochs=2, steps=2, baseline=[1e4, 1e4])
    code, launched, err = cli(capsys, "launch", str(path))
    assert code == 0, err
    data = run_json(capsys, "status", str(path), "-f", "json")
    _, status, _ = cli(capsys, "status", str(path))
    _, best, _ = cli(capsys, "best", str(path))
    lines = {int(line.split()[1]): line for line in launched.splitlines() if line.startswith("trial ")}
    for t in data["trials"]:
        for metric, value in (t["values"] or {}).items():
            # rounded once, where the records are: the objective value is the last record's stored value
            assert value == t["final"][metric]
            shown = number(value)
            assert f"{metric}={shown}" in lines[t["number"]]
            assert shows(status, shown)
        threshold = number(t["params"]["fallback_threshold"])
        assert f"fallback_threshold={threshold}" in lines[t["number"]] and shows(status, threshold)
    for row in run_json(capsys, "best", str(path), "-f", "json")["pareto_front"]:
        assert all(shows(best, number(v)) for v in row["values"].values())


def test_the_status_table_fits_120_columns_and_wide_shows_everything(
    study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from koopman_search.search.cli.status import status_text

    data = run_json(capsys, "status", str(study), "-f", "json")
    data["trials"][0]["label"] = "a label far longer than the room a table of 120 columns leaves for it " * 3
    narrow, wide = status_text(data), status_text(data, wide=True)
    assert max(len(line) for line in narrow.splitlines()) <= 120
    assert "--wide" in narrow
    assert "val_koopman_forward_ppl" in wide and "val_koopman_forward_ppl" not in narrow.splitlines()[1]
    label = data["trials"][0]["label"].strip()
    assert label in wide
    # too long for the table: the note goes under it, whole, wrapped
    assert f"#0: {label}" in " ".join(line.strip() for line in narrow.splitlines())


def test_csv_has_no_empty_parent_column_for_a_nested_field(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from koopman_search.search.cli._output import flat_rows

    columns, _ = flat_rows([{"number": 0, "values": {"a": 1.0}}, {"number": 1, "values": None}])
    assert columns == ["number", "values.a"]
