"""``koopman-search report``: one self-contained HTML file about a study, to open offline or send around."""

from __future__ import annotations

import argparse
import logging
import stat
import tempfile
from pathlib import Path
from typing import Any

from koopman_search.search.cli._common import StudyTarget, add_study_args, resolve_target
from koopman_search.trainer.errors import ConfigError

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  koopman-search report studies/quickstart.toml --out report.html
  koopman-search report --study-name wikitext2-koopman --storage sqlite:///studies/wikitext2-koopman.db

The file holds plotly.js itself (about 5 MB), so it opens without a network connection. Nothing is
re-run: every figure comes from what the trials stored.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a study",
        description="Write one HTML file with the study's summary, best trial or Pareto front, optimization "
        "history, parameter importances, parallel coordinates, per-trial curves, prune reasons and the "
        "best trial's trainer config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_args(parser, file_required=False)
    parser.add_argument(
        "--out", default="report.html", metavar="FILE", help="the HTML file to write (default: report.html)"
    )
    return parser


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def _study_files(args: argparse.Namespace, target: StudyTarget) -> list[tuple[Path, str]]:
    """The files the report must never replace: the study file, its SQLite database (with its journal, WAL and
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


def _check_out(out: Path, own: list[tuple[Path, str]]) -> None:
    """Refuse (exit 2, before anything is read or written) an --out that is not a regular file the report may
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
            f"{_kind(out.stat().st_mode)}; the report replaces the file it writes, so give a new path"
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
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".report-", suffix=".probe"):
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


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.engine.study import load_study
    from koopman_search.search.review.open import open_existing_storage
    from koopman_search.search.review.report import write_report

    out = Path(args.out)
    target = resolve_target(args)
    _check_out(out, _study_files(args, target))
    study = load_study(open_existing_storage(target.storage_url), target.study_name)
    logger.info("report of study %s (%d trials)", study.study_name, len(study.get_trials(deepcopy=False)))
    write_report(study, out)
    return 0
