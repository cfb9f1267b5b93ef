"""Settings from the environment (search/settings.py): a bad value stops every command with one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from koopman_search.search.cli import main
from koopman_search.search.settings import env_setting


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("KOOPMAN_HEARTBEAT_INTERVAL", "0", "KOOPMAN_HEARTBEAT_INTERVAL must be an integer >= 1"),
        ("KOOPMAN_HEARTBEAT_INTERVAL", "abc", "KOOPMAN_HEARTBEAT_INTERVAL must be an integer >= 1"),
        ("KOOPMAN_OUTAGE_TIMEOUT", "-5", "KOOPMAN_OUTAGE_TIMEOUT must be a number >= 0"),
        ("KOOPMAN_OUTAGE_TIMEOUT", "nan", "KOOPMAN_OUTAGE_TIMEOUT must be a number >= 0"),
        ("KOOPMAN_ENV_RETRY_MAX", "-1", "KOOPMAN_ENV_RETRY_MAX must be an integer >= 0"),
    ],
)
def test_a_bad_setting_stops_a_command_with_one_line_and_exit_2_before_anything_is_written(
    name: str,
    raw: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, raw)
    study = tmp_path / "s.toml"
    study.write_text('[study]\nname = "s"\n', encoding="utf-8")
    assert main(["create", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and f"but got {name}={raw!r}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]  # no database, no artifacts


def test_a_setting_reads_its_default_when_unset_and_its_value_when_good(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOOPMAN_OUTAGE_TIMEOUT", raising=False)
    assert env_setting("KOOPMAN_OUTAGE_TIMEOUT") == 1800
    monkeypatch.setenv("KOOPMAN_OUTAGE_TIMEOUT", "2.5")
    assert env_setting("KOOPMAN_OUTAGE_TIMEOUT") == 2.5
    monkeypatch.setenv("KOOPMAN_HEARTBEAT_INTERVAL", "abc")  # read at import by a library user: the default
    assert env_setting("KOOPMAN_HEARTBEAT_INTERVAL") == 30
