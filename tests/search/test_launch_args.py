"""launch's own arguments, checked before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from koopman_search.search.cli import main


@pytest.mark.parametrize("slots", [["--workers", "2"], ["--gpus", "0,1"]])
def test_launch_refuses_a_device_that_its_slots_would_ignore(
    slots: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "s.toml"
    study.write_text('[study]\nname = "s"\n', encoding="utf-8")
    assert main(["launch", str(study), "--device", "cpu", *slots]) == 2
    err = capsys.readouterr().err
    assert "--device applies to a launch in one process" in err and "device='cpu'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


@pytest.mark.parametrize("command", [["launch"], ["worker", "--workers", "2"]])
def test_a_missing_data_folder_stops_a_command_that_trains_before_anything_is_written(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "s.toml"
    study.write_text('[study]\nname = "s"\n[trainer.data]\nsource = "files:no-such-data"\n', encoding="utf-8")
    assert main([command[0], str(study), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "the corpus directory must exist" in err and "no-such-data" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]
    (tmp_path / "no-such-data").mkdir()
    (tmp_path / "no-such-data" / "train.txt").write_text("a b c\n")
    assert main([command[0], str(study), *command[1:]]) == 2
    assert "the valid split file must exist" in capsys.readouterr().err
