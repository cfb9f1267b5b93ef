"""launch's own arguments, checked before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.cli import main


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
