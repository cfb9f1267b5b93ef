"""A throwaway PostgreSQL server for the test session, for a machine where PostgreSQL is installed but not
running: ``initdb`` into a temp dir, ``pg_ctl start`` on a free port of 127.0.0.1 (trust auth, user
postgres), and everything removed at the end. As root the server runs as the ``postgres`` user (initdb
refuses root)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BIN_GLOB", "PostgresStartError", "ThrowawayPostgres"]

BIN_GLOB = "/usr/lib/postgresql/*/bin"  # Debian's layout; newest version first
START_TIMEOUT_S = 60


class PostgresStartError(RuntimeError):
    pass


def _bin_dirs() -> list[str]:
    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parent.name
        return tuple(int(x) for x in part.split(".") if x.isdigit())

    return sorted(glob.glob(BIN_GLOB), key=version, reverse=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ThrowawayPostgres:
    data_dir: Path
    port: int
    bin_dir: Path
    user: str | None  # the system user the server runs as (None: this process's)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def start(cls, bin_dirs: Sequence[str] | None = None) -> ThrowawayPostgres:
        dirs = _bin_dirs() if bin_dirs is None else list(bin_dirs)
        found = [Path(d) for d in dirs if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file()]
        if not found:
            raise PostgresStartError(
                f"no initdb and pg_ctl found under {BIN_GLOB}; install PostgreSQL "
                "(Debian: apt-get install postgresql) or start a server"
            )
        user = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresStartError(
                    "running as root, and initdb refuses root, but there is no postgres user to run the server as"
                ) from None
            user = "postgres"
        data_dir = Path(tempfile.mkdtemp(prefix="koopman-test-pg-"))
        if user is not None:
            shutil.chown(data_dir, user)
        server = cls(data_dir, _free_port(), found[0], user)
        try:
            server._run(
                "initdb", "-D", str(data_dir / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
            )
            server._run(
                "pg_ctl",
                "-D",
                str(data_dir / "data"),
                "-l",
                str(data_dir / "log"),
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "-o",
                f"-p {server.port} -h 127.0.0.1 -k {data_dir} -F",
                "start",
            )
        except PostgresStartError:
            server.stop()
            raise
        return server

    def _run(self, tool: str, *args: str) -> None:
        try:
            done = subprocess.run(
                [str(self.bin_dir / tool), *args],
                capture_output=True,
                text=True,
                user=self.user,
                timeout=START_TIMEOUT_S + 30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PostgresStartError(f"{tool} failed: {exc}") from exc
        if done.returncode != 0:
            log = self.data_dir / "log"
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise PostgresStartError(f"{tool} exited {done.returncode}: {(done.stderr or done.stdout).strip()} {tail}")

    def stop(self) -> None:
        if (self.data_dir / "data" / "postmaster.pid").exists():
            subprocess.run(
                [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir / "data"), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                user=self.user,
                timeout=60,
                check=False,
            )
        shutil.rmtree(self.data_dir, ignore_errors=True)
