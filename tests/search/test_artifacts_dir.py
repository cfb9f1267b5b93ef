"""The artifacts directory: refused before the database is written when unusable, made again when removed."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest

from koopman_search.search.cli import main
from koopman_search.search.storage.artifacts import AtomicFileSystemArtifactStore


def study_file(tmp_path: Path, artifacts: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(f'[study]\nname = "s"\nartifacts = "{artifacts}"\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["create", "launch"])
def test_artifacts_naming_a_file_is_refused_before_the_database_is_written(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("x")
    assert main([command, str(study_file(tmp_path, "afile"))]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "artifacts must be a directory, but got artifacts=" in err and "which is a file" in err
    )
    assert not (tmp_path / "s.db").exists()


def test_artifacts_on_a_read_only_file_system_is_refused_before_the_database_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)  # as on a read-only mount
    assert main(["create", str(study_file(tmp_path, "art"))]) == 2
    err = capsys.readouterr().err
    assert "artifacts must be a directory this process can write to" in err and "Read-only file system" in err
    assert not (tmp_path / "s.db").exists()


def test_a_store_whose_directory_was_removed_makes_it_again_and_writes(tmp_path: Path) -> None:
    root = tmp_path / "art"
    root.mkdir()
    store = AtomicFileSystemArtifactStore(str(root))
    root.rmdir()  # removed while the study runs
    store.write("ckpt-1", io.BytesIO(b"weights"))
    assert (root / "ckpt-1").read_bytes() == b"weights"
