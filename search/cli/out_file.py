"""``--out FILE`` of the commands that write a file (report, recommend): what they refuse to replace.

Each writes a temporary file beside the target and renames it over it, so a target that is not a regular
file, or that is one of the study's own files, is refused before the study is read (exit 2, nothing written).
"""

from __future__ import annotations

import argparse
import stat
import tempfile
from pathlib import Path

from koopman_search.search.cli._common import StudyTarget
from koopman_search.trainer.errors import ConfigError

__all__ = ["check_out", "own_files"]

SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def own_files(args: argparse.Namespace, target: StudyTarget) -> list[tuple[Path, str]]:
    """The files a command's --out must never replace: the study file, its SQLite database (with its journal, WAL and
    shared-memory files) and anything under its artifacts directory."""
    from sqlalchemy.engine import make_url  # the CLI's parser loads without SQLAlchemy

    own: list[tuple[Path, str]] = []
    if getattr(args, "study", None):
        own.append((Path(args.study), "the study file"))
    url = make_url(target.storage_url)
    if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
        db = Path(url.database)
        own += [(db, "the study's database")]
        own += [(Path(f"{db}{suffix}"), "the study's database") for suffix in ("-wal", "-shm", "-journal")]
    if target.spec is not None and "://" not in target.spec.artifacts_dir:
        own.append((Path(target.spec.artifacts_dir), "the study's artifacts directory"))
    return own


def check_out(out: Path, own: list[tuple[Path, str]]) -> None:
    """Refuse (exit 2, before anything is read or written) an --out that is not a regular file the command may
    replace: a directory, a FIFO, a device or a socket, one of the study's own files, or any SQLite database."""
    if out.is_dir():
        raise ConfigError(f"--out must be a file path, but got out={str(out)!r}, which is a directory")
    if not out.parent.is_dir():
        raise ConfigError(
            f"--out must be in an existing directory, but got out={str(out)!r} "
            f"(no directory {str(out.parent)!r}); create it first"
        )
    if out.exists() and not stat.S_ISREG(out.stat().st_mode):
        raise ConfigError(
            f"--out must be a regular file or a new path, but got out={str(out)!r}, which is a "
            f"{_kind(out.stat().st_mode)}; the command replaces the file it writes, so give a new path"
        )
    target = out.resolve()
    for path, what in own:
        mine = path.resolve()
        if target == mine or mine in target.parents:
            raise ConfigError(
                f"--out must not replace {what}, but got out={str(out)!r} ({str(path)!r}); give another path"
            )
    if out.is_file():
        with out.open("rb") as fh:
            if fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC:
                raise ConfigError(
                    f"--out must not replace a database, but got out={str(out)!r}, which is an SQLite database; "
                    "give another path"
                )
    try:  # a directory we cannot write to (read-only, /proc) is found before the study is read
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".koopman-search-", suffix=".probe"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--out must be in a directory this process can write to, but got out={str(out)!r} ({exc.strerror or exc})"
        ) from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "socket" if stat.S_ISSOCK(mode) else "special file"
