"""Fixtures shared by every test: small trainer configs, the WikiText-2 copy, and a real PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2"
# PostgreSQL for the distributed tests. CI makes sure the server is up; a missing server FAILS the tests.
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


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards. Fails (not skips) if the
    server is down."""
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"ks_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:  # pragma: no cover - the failure path is the point
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc.orig}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
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
