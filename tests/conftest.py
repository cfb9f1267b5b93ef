"""Fixtures shared by every test: small trainer configs, the WikiText-2 copy, and a real PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2"
# PostgreSQL for the distributed tests: this server, or else a throwaway one the session starts itself
# (postgres_admin_url); when neither can be had the tests FAIL.
POSTGRES_ADMIN_URL = os.environ.get(
    "KOOPMAN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Token caches go to one temp dir per test session, never to the user's home."""
    monkeypatch.setenv("KOOPMAN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token-cache"))


@pytest.fixture(scope="session")
def wikitext2_dir() -> Path:
    if not (WIKITEXT2 / "train.txt").exists():
        pytest.fail(f"WikiText-2 copy not found at {WIKITEXT2} (../shared/data/wikitext-2 beside the repo)")
    return WIKITEXT2


def _unreachable(url: str) -> str | None:
    """Why the server at ``url`` cannot be used, or None when it answers."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        return str(exc.orig).strip().splitlines()[0]
    finally:
        engine.dispose()
    return None


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """The server for the distributed tests: the configured one when it answers; else, unless
    KOOPMAN_TEST_POSTGRES_URL names a server on purpose, a throwaway one started for this session
    (tests/pg_server.py). Fails (never skips) when neither works."""
    from tests.pg_server import PostgresStartError, ThrowawayPostgres

    error = _unreachable(POSTGRES_ADMIN_URL)
    if error is None:
        yield POSTGRES_ADMIN_URL
        return
    if "KOOPMAN_TEST_POSTGRES_URL" in os.environ:
        pytest.fail(f"PostgreSQL is not reachable at KOOPMAN_TEST_POSTGRES_URL={POSTGRES_ADMIN_URL}: {error}")
    try:
        server = ThrowawayPostgres.start()
    except PostgresStartError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({error}) and no throwaway server "
            f"could be started: {exc}"
        )
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards. Fails (not skips) if no server
    can be had (:func:`postgres_admin_url`)."""
    import sqlalchemy as sa

    admin = sa.create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    name = f"ks_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:  # pragma: no cover - the failure path is the point
        pytest.fail(f"PostgreSQL is not reachable at {postgres_admin_url}: {exc.orig}")
    url = postgres_admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
