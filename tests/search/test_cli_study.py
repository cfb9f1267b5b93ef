"""The study commands' input side: bad study files write nothing, passwords stay hidden, and the storage
comes from ``--storage`` or ``$OPTUNA_STORAGE``. Commands run in process through ``koopman_search.search.cli.main``."""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from koopman_search.search.cli import main
from koopman_search.search.errors import StorageError
from tests.search.study_files import cli, error_lines, logging_restored, study_names, write_study

BAD = Path(__file__).resolve().parent / "bad_studies"
BAD_FILES = sorted(BAD.glob("*.toml"))
UNSET = "KOOPMAN_SEARCH_TEST_UNSET"  # the catalogue's files that use ${...} rely on it being unset
PASSWORD = "s3cret"
UNREACHABLE = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/nope"  # nothing listens on port 1


@pytest.fixture(autouse=True)
def _cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("KOOPMAN_ARTIFACTS", raising=False)
    monkeypatch.delenv(UNSET, raising=False)
    with logging_restored():
        yield


@contextmanager
def _logs_into(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Send the service's and its libraries' log records to ``caplog`` even though ``main`` replaces the
    root logger's handlers (it configures logging the way a command-line process does)."""
    loggers = [logging.getLogger(name) for name in ("koopman_search", "optuna", "sqlalchemy")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    if not first.startswith("# expect: "):
        raise ValueError(f"{path.name} must start with an '# expect: ...' line")
    return first.removeprefix("# expect: ")


# ---- the bad-study catalogue -------------------------------------------------------------------------------


def test_the_catalogue_is_there() -> None:
    assert len(BAD_FILES) >= 50


@pytest.mark.parametrize("command", ["create", "launch"])
@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_bad_study_exits_2_with_one_line_and_creates_no_sqlite_file(
    path: Path, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "x.db"
    code, out, err = cli(capsys, command, str(path), "--storage", f"sqlite:///{db}")
    assert code == 2
    [line] = error_lines(err, command)
    assert _expected(path) in line
    assert path.name in line
    assert "Traceback" not in err
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # no database, lock file or artifact store
    assert not [p.name for p in BAD.iterdir() if p.suffix in (".db", ".lock") or p.name.endswith("-artifacts")]


@pytest.mark.postgres
def test_bad_studies_leave_postgresql_without_a_study_or_a_table(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for path in BAD_FILES:
        for command in ("create", "launch"):
            code, _, err = cli(capsys, command, str(path), "--storage", postgres_url)
            assert code == 2, f"{path.name}: {err}"
            assert any(_expected(path) in line for line in error_lines(err, command)), path.name
    engine = sa.create_engine(postgres_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_naming_no_study_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "status", "--study-name", "tiny")
    assert code == 2
    [line] = error_lines(err, "status")
    assert "give STUDY.toml, or --study-name NAME with --storage URL" in line


# ---- passwords ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "best"])
def test_password_of_an_unreachable_storage_is_masked_in_the_error(
    command: str, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with _logs_into(caplog):
        code, out, err = cli(capfd, command, "--study-name", "x", "--storage", UNREACHABLE)
    assert code == 1
    [line] = error_lines(err, command)
    assert "cannot open storage postgresql+psycopg://postgres:***@127.0.0.1:1/nope" in line
    assert PASSWORD not in out + err + caplog.text


def test_password_from_an_environment_variable_stays_out_of_errors_and_tracebacks(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = "s3cr@t/pw"  # characters a URL must escape: the file's ${VAR} is percent-encoded into the URL
    hidden = (raw, "s3cr%40t%2Fpw")
    monkeypatch.setenv("KS_TEST_DB_PASSWORD", raw)
    study = write_study(tmp_path, storage="postgresql+psycopg://postgres:${KS_TEST_DB_PASSWORD}@127.0.0.1:1/nope")
    seen = ""
    with _logs_into(caplog):
        for command in ("create", "launch", "status", "best"):
            code, out, err = cli(capfd, command, str(study))
            assert code == 1, err
            [line] = error_lines(err, command)
            assert "postgres:***@127.0.0.1:1/nope" in line
            seen += out + err
        with pytest.raises(StorageError) as info:  # --debug shows the traceback instead
            main(["--debug", "status", str(study)])
    seen += "".join(traceback.format_exception(info.value)) + capfd.readouterr().err + caplog.text
    assert not [secret for secret in hidden if secret in seen]


@pytest.mark.postgres
def test_password_in_a_working_storage_url_never_reaches_output_or_logs(
    postgres_url: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the test server trusts local connections, so any password gets in and the commands succeed
    url = sa.engine.make_url(postgres_url).set(password=PASSWORD).render_as_string(hide_password=False)
    study = write_study(tmp_path, n_trials=1, baseline=[1e4, 1e4, 1e4])
    seen = ""
    with _logs_into(caplog):
        for argv in (
            ["create", str(study), "--storage", url],
            ["launch", str(study), "--storage", url],
            ["status", "--study-name", "tiny", "--storage", url],
            ["best", "--study-name", "tiny", "--storage", url, "--format", "toml"],
        ):
            code, out, err = cli(capfd, "--debug", *argv)
            assert code == 0, err
            seen += out + err
    assert "postgres:***@" in seen  # create names the storage, password masked
    assert caplog.records  # debug logging was on and captured: the check below looks at real logs
    assert PASSWORD not in seen + caplog.text


# ---- where the storage comes from --------------------------------------------------------------------------


def test_storage_comes_from_optuna_storage_and_the_flag_wins_over_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = write_study(tmp_path / "studies")  # its own storage: studies/tiny.db
    env_db, flag_db = tmp_path / "env.db", tmp_path / "flag.db"
    monkeypatch.setenv("OPTUNA_STORAGE", f"sqlite:///{env_db}")

    code, _, err = cli(capsys, "create", str(study), "--storage", f"sqlite:///{flag_db}")
    assert code == 0, err
    assert study_names(f"sqlite:///{flag_db}") == ["tiny"]
    assert not env_db.exists()

    code, out, err = cli(capsys, "create", str(study))
    assert code == 0, err
    assert f"study tiny created in sqlite:///{env_db}" in out
    assert study_names(f"sqlite:///{env_db}") == ["tiny"]
    assert not (tmp_path / "studies" / "tiny.db").exists()

    code, out, err = cli(capsys, "status", "--study-name", "tiny", "--format", "json")
    assert code == 0, err
    assert [t["state"] for t in json.loads(out)["trials"]] == ["WAITING"] * 4


def test_a_read_command_without_a_study_says_what_is_missing_in_words(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("KOOPMAN_STORAGE_FILE", raising=False)
    assert main(["status", "--study-name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("but got --study-name x and no storage") and "None" not in err
