"""The review commands: report and dashboard, in process, exit codes and messages."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import optuna_dashboard
import pytest

from koopman_search.search.cli import main
from koopman_search.search.errors import StorageError
from tests.search.review.synthetic import (
    EPOCHS,
    STUDY_NAME,
    wait_for,
)
from tests.search.study_files import interruptible

REPO = Path(__file__).resolve().parents[3]
optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- the commands -------------------------------------------------------------------------------------------


def test_report_command_writes_the_file(study: optuna.Study, storage_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out.html"
    code = main(["report", "--study-name", STUDY_NAME, "--storage", storage_url, "--out", str(out)])
    assert code == 0
    assert out.stat().st_size > 1_000_000 and "<h2>Pareto front</h2>" in out.read_text(encoding="utf-8")


def test_report_command_reads_name_and_storage_from_the_study_file(study: optuna.Study, tmp_path: Path) -> None:
    # the study file's default storage is <its folder>/<name>.db, where the fixture put the study
    study_file = tmp_path / "review.toml"
    study_file.write_text(f'[study]\nname = "{STUDY_NAME}"\n\n[trainer.train]\nepochs = {EPOCHS}\n')
    out = tmp_path / "from-file.html"
    assert main(["report", str(study_file), "--out", str(out)]) == 0
    assert out.is_file()


def test_report_command_takes_storage_from_the_environment(
    study: optuna.Study, storage_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTUNA_STORAGE", storage_url)
    out = tmp_path / "env.html"
    assert main(["report", "--study-name", STUDY_NAME, "--out", str(out)]) == 0
    assert out.is_file()


def test_report_command_with_out_in_a_missing_directory_exits_2_naming_it(
    study: optuna.Study, storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nope" / "report.html"
    code = main(["report", "--study-name", STUDY_NAME, "--storage", storage_url, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "koopman-search report: error: --out must be in an existing directory" in err
    assert str(tmp_path / "nope") in err
    assert not out.parent.exists()


def test_report_out_never_replaces_the_studys_own_database_or_study_file(
    study: optuna.Study, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study_file = tmp_path / "review.toml"
    study_file.write_text(f'[study]\nname = "{STUDY_NAME}"\n\n[trainer.train]\nepochs = {EPOCHS}\n')
    db = tmp_path / f"{STUDY_NAME}.db"  # the study file's default storage, where the fixture put the study
    before = {p: p.read_bytes() for p in (study_file, db)}
    for out, what in ((db, "the study's database"), (study_file, "the study file")):
        code = main(["report", str(study_file), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"--out must not replace {what}, but got out={str(out)!r}" in err
    assert {p: p.read_bytes() for p in before} == before  # nothing written
    assert main(["status", str(study_file)]) == 0  # and the study still reads


def test_report_out_never_replaces_another_sqlite_database(
    study: optuna.Study, storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.sqlite"
    optuna.create_study(storage=f"sqlite:///{other}", study_name="x")
    before = other.read_bytes()
    code = main(["report", "--study-name", STUDY_NAME, "--storage", storage_url, "--out", str(other)])
    assert code == 2
    assert "which is an SQLite database" in capsys.readouterr().err
    assert other.read_bytes() == before


def test_report_out_refuses_a_fifo_and_leaves_it_a_fifo(
    study: optuna.Study, storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = main(["report", "--study-name", STUDY_NAME, "--storage", storage_url, "--out", str(fifo)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--out must be a regular file or a new path" in err and "which is a FIFO" in err
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_report_command_with_a_missing_study_exits_1_listing_the_studies(
    study: optuna.Study, storage_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    code = main(["report", "--study-name", "no-such-study", "--storage", storage_url, "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "no study named 'no-such-study'" in err and f"studies there: {STUDY_NAME}" in err
    assert not out.exists()


def test_report_command_with_a_missing_sqlite_file_exits_2_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "missing.db"
    code = main(["report", "--study-name", "x", "--storage", f"sqlite:///{db}", "--out", str(tmp_path / "r.html")])
    assert code == 2
    assert "storage file must exist" in capsys.readouterr().err
    assert not db.exists()


def test_dashboard_command_without_a_storage_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    assert main(["dashboard"]) == 2
    assert "a storage is required" in capsys.readouterr().err


def test_dashboard_command_with_a_missing_study_exits_1_before_serving(
    study: optuna.Study, storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dashboard", "--storage", storage_url, "--study-name", "nope", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "no study named 'nope'" in err and f"studies there: {STUDY_NAME}" in err
    assert optuna_dashboard.get_note(study) == ""  # nothing annotated either


def test_dashboard_command_on_a_busy_port_warns_about_the_open_host_and_exits_2(
    study: optuna.Study, storage_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["dashboard", "--storage", storage_url, "--host", "0.0.0.0", "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert "reachable from other machines" in err
    assert f"cannot listen on 0.0.0.0:{port}" in err
    assert optuna_dashboard.get_note(study).startswith("## ")  # annotated before trying to serve


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "docker-stop"])
def test_dashboard_command_serves_the_api_until_stopped(
    study: optuna.Study, storage_url: str, stop: signal.Signals
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "koopman_search.search.cli", "dashboard", "--storage", storage_url, "--port", str(port)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=interruptible,
    )
    studies: list[Any] = []

    def listed() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                studies[:] = json.load(response)["study_summaries"]
            return True
        except OSError:
            return proc.poll() is not None

    try:
        wait_for(listed, 60, "the dashboard command to answer")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert [s["study_name"] for s in studies] == [STUDY_NAME]
    finally:
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"optuna-dashboard at http://127.0.0.1:{port}/dashboard" in err
    assert "Traceback" not in err


def test_the_reading_commands_leave_a_plain_optuna_files_journal_mode_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    from koopman_search.search.review.open import open_existing_storage

    db = tmp_path / "plain.db"
    url = f"sqlite:///{db}"
    study = optuna.create_study(study_name="plain", storage=url, directions=["minimize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    del study
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone() == ("delete",)
    before = db.read_bytes()
    target = ["--study-name", "plain", "--storage", url]
    for command in (["status"], ["best"], ["recommend"], ["report", "--out", str(tmp_path / "r.html")]):
        assert main([*command, *target]) in (0, 1), command  # recommend: no koopman-search trial to recommend
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.db", "r.html"]  # no -wal, -shm or journal
    # opened read-only: a write fails instead of changing the file
    storage = open_existing_storage(url, read_only=True)
    loaded = optuna.load_study(study_name="plain", storage=storage)
    with pytest.raises(StorageError, match="the database is read-only here"):
        loaded.set_user_attr("x", 1)
    assert db.read_bytes() == before
