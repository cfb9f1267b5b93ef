"""URLs and paths of study files: ``${VAR}`` expansion, resolution against the file's folder, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from koopman_search.search.errors import SpecError
from koopman_search.search.studyfile.urls import (
    expand_env,
    redact_text,
    redact_url,
    resolve_artifacts,
    resolve_path,
    resolve_storage_url,
)

UNSET = "KS_TEST_SURELY_UNSET_VARIABLE"


def test_redact_url_hides_the_password() -> None:
    assert redact_url("postgresql+psycopg://koopman:s3cret@127.0.0.1:5432/ks") == (
        "postgresql+psycopg://koopman:***@127.0.0.1:5432/ks"
    )


def test_redact_url_leaves_urls_without_password_alone() -> None:
    assert redact_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert redact_url("postgresql+psycopg://koopman@h/ks") == "postgresql+psycopg://koopman@h/ks"


def test_redact_url_hides_the_password_of_an_unparsable_url() -> None:
    assert redact_url("postgresql://koopman:s3cret@h:notaport/ks") == "postgresql://koopman:***@h:notaport/ks"


def test_redact_text_hides_the_password_wherever_it_appears() -> None:
    url = "postgresql+psycopg://koopman:s3cret@db/ks"
    assert redact_text("connection to db failed for password s3cret", url) == (
        "connection to db failed for password ***"
    )
    assert redact_text("no secret here", "sqlite:////tmp/x.db") == "no secret here"


def test_expand_env_percent_encodes_a_password_but_not_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KS_TEST_PASSWORD", "p@ss/w:rd")
    monkeypatch.setenv("KS_TEST_HOST", "db.example")
    url = expand_env("postgresql://u:${KS_TEST_PASSWORD}@${KS_TEST_HOST}/ks", "x.toml", "study.storage", in_url=True)
    assert url == "postgresql://u:p%40ss%2Fw%3Ard@db.example/ks"
    assert expand_env("/data/${KS_TEST_HOST}", "x.toml", "study.artifacts") == "/data/db.example"


def test_expand_env_names_a_missing_variable_and_a_malformed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(UNSET, raising=False)
    with pytest.raises(SpecError, match=rf"environment variable {UNSET} is not set.*\(x.toml, \[study.artifacts\]\)"):
        expand_env(f"/data/${{{UNSET}}}", "x.toml", "study.artifacts")
    with pytest.raises(SpecError, match=r"\$\{\.\.\.\} must name a variable"):
        expand_env("/data/${1bad}", "x.toml", "study.artifacts")


def test_relative_paths_resolve_against_the_study_files_folder(tmp_path: Path) -> None:
    assert resolve_path(tmp_path, "runs/../x.db") == str(tmp_path / "x.db")
    assert resolve_storage_url("", "demo", "x.toml", tmp_path) == f"sqlite:///{tmp_path / 'demo.db'}"
    assert resolve_storage_url("sqlite:///runs/x.db", "demo", "x.toml", tmp_path) == (
        f"sqlite:///{tmp_path / 'runs' / 'x.db'}"
    )
    assert resolve_artifacts("", "demo", "x.toml", tmp_path) == str(tmp_path / "demo-artifacts")
    assert resolve_artifacts("s3://bucket/prefix", "demo", "x.toml", tmp_path) == "s3://bucket/prefix"


def test_a_storage_url_of_an_unknown_backend_is_refused_without_its_password(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"storage must use one of sqlite, postgresql, mysql") as info:
        resolve_storage_url("redis://u:s3cret@h/0", "demo", "x.toml", tmp_path)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://koopman@db/ks?password=s3cret", "postgresql+psycopg://koopman@db/ks?password=***"),
        (
            "postgresql+psycopg://koopman:pw@db/ks?sslmode=require&sslpassword=s3cret",
            "postgresql+psycopg://koopman:***@db/ks?sslmode=require&sslpassword=***",
        ),
        ("postgresql://koopman@db/ks?PassWord=s3cret&x=1", "postgresql://koopman@db/ks?PassWord=***&x=1"),
    ],
)
def test_redact_url_hides_a_password_given_in_the_query_string(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_text(f"could not connect with {url}: password s3cret rejected", url)
