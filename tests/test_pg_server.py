"""The throwaway PostgreSQL server that the test session starts when the configured one is down."""

from __future__ import annotations

import socket

import pytest
import sqlalchemy as sa

from tests.pg_server import PostgresStartError, ThrowawayPostgres


def test_a_throwaway_server_starts_on_a_free_port_answers_and_is_gone_after_stop() -> None:
    server = ThrowawayPostgres.start()
    try:
        engine = sa.create_engine(server.url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_user")).scalar() == "postgres"
        engine.dispose()
        assert server.port != 5432
    finally:
        server.stop()
    assert not server.data_dir.exists()
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", server.port))


def test_without_postgresql_installed_it_says_what_to_install() -> None:
    with pytest.raises(PostgresStartError, match=r"no initdb and pg_ctl found under /usr/lib/postgresql/\*/bin"):
        ThrowawayPostgres.start(bin_dirs=[])
