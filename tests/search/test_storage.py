"""The storage: retries of database calls, the cross-process lock, heartbeats and opening errors."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from koopman_search.search.errors import StorageError
from koopman_search.search.storage.database import Heartbeat, exclusive, open_storage
from koopman_search.search.storage.optuna_private import database_of
from koopman_search.search.storage.retry import retrying

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ---- retries of database calls -----------------------------------------------------------------------------


def _operational_error() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))


def test_retrying_calls_again_after_transient_database_errors() -> None:
    failures = [_operational_error(), _operational_error()]
    slept: list[float] = []

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    assert retrying(flaky, "read", sleep=slept.append) == "ok"
    assert slept == [1.0, 2.0]


def test_retrying_gives_up_after_its_timeout_and_lets_other_errors_through() -> None:
    slept: list[float] = []

    def down() -> None:
        raise _operational_error()

    with pytest.raises(StorageError, match=r"read: the database stayed unreachable for 7 s"):
        retrying(down, "read", timeout=5.0, sleep=slept.append)
    assert slept == [1.0, 2.0, 4.0]

    def broken() -> None:
        raise sqlalchemy.exc.ProgrammingError("SELECT", {}, Exception("syntax error"))

    with pytest.raises(sqlalchemy.exc.ProgrammingError):
        retrying(broken, "read", sleep=slept.append)


def test_retrying_counts_the_time_a_hanging_call_took_not_only_its_pauses() -> None:
    now = [0.0]
    slept: list[float] = []

    def hangs_then_fails() -> None:
        now[0] += 40.0  # each call hangs 40 s before the connection fails
        raise _operational_error()

    with pytest.raises(StorageError, match=r"read: the database stayed unreachable for 4\d s"):
        retrying(hangs_then_fails, "read", timeout=30.0, sleep=slept.append, clock=lambda: now[0])
    assert slept == [1.0]  # gave up at the second failure, 40 s after the first, not after 30 s of pauses


def test_postgresql_connections_get_a_connect_timeout_unless_the_url_sets_one() -> None:
    from koopman_search.search.storage.database import CONNECT_TIMEOUT, engine_kwargs

    pg = engine_kwargs("postgresql+psycopg://postgres@127.0.0.1:5432/db")
    assert pg["connect_args"] == {"connect_timeout": CONNECT_TIMEOUT} and pg["pool_pre_ping"]
    assert "connect_args" not in engine_kwargs("postgresql+psycopg://postgres@127.0.0.1/db?connect_timeout=3")
    assert engine_kwargs("sqlite:///x.db")["connect_args"] == {"timeout": 60}


# ---- the lock ------------------------------------------------------------------------------------------------


def test_exclusive_on_sqlite_lets_one_holder_in_at_a_time(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'lock.db'}", heartbeat=False)
    inside: list[str] = []

    def second() -> None:
        with exclusive(storage, "budget"):
            inside.append("second")

    with exclusive(storage, "budget"):
        inside.append("first")
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)  # the second holder must still be waiting
        assert inside == ["first"]
    thread.join(timeout=30)
    assert inside == ["first", "second"]


def test_exclusive_on_postgresql_lets_one_holder_in_at_a_time(postgres_url: str) -> None:
    storage = open_storage(postgres_url, heartbeat=False)
    inside: list[str] = []

    def second() -> None:
        with exclusive(storage, "budget"):
            inside.append("second")

    with exclusive(storage, "budget"):
        inside.append("first")
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        assert inside == ["first"]
    thread.join(timeout=30)
    assert inside == ["first", "second"]


@pytest.mark.postgres
def test_a_held_postgresql_lock_keeps_no_transaction_open(postgres_url: str) -> None:
    # a warmup rebuild trains for minutes under this lock: an open transaction would hold back vacuum and
    # count against idle_in_transaction_session_timeout the whole time
    storage = open_storage(postgres_url, heartbeat=False)
    query = sqlalchemy.text(
        "SELECT state FROM pg_stat_activity WHERE pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory')"
    )
    with exclusive(storage, "warmup"):
        with sqlalchemy.create_engine(postgres_url).connect() as watcher:
            states = [row[0] for row in watcher.execute(query)]
    assert states == ["idle"]
    with sqlalchemy.create_engine(postgres_url).connect() as watcher:
        assert list(watcher.execute(query)) == []  # and released


# ---- heartbeats ----------------------------------------------------------------------------------------------


def test_heartbeat_records_beats_while_it_is_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'beat.db'}", heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="beat")
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna expects heartbeats under Study.optimize only
        trial = study.ask()
    database = database_of(storage)
    record, beats = database.record_heartbeat, []

    def counted(trial_id: int) -> None:
        beats.append(trial_id)
        record(trial_id)

    monkeypatch.setattr(database, "record_heartbeat", counted)
    with Heartbeat(storage, trial._trial_id, interval=0.05):
        time.sleep(0.5)
    closed = len(beats)
    time.sleep(0.3)
    assert closed >= 3 and len(beats) == closed  # it beat again and again while open, and not after
    assert set(beats) == {trial._trial_id}
    with sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'beat.db'}").connect() as conn:
        rows = conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM trial_heartbeats")).scalar()
    assert rows == 1  # the database keeps the trial's latest beat


# ---- opening ---------------------------------------------------------------------------------------------------


def test_an_unreachable_storage_is_one_error_without_the_password() -> None:
    url = "postgresql+psycopg://koopman:s3cret@127.0.0.1:1/ks"
    with pytest.raises(StorageError, match=r"cannot open storage postgresql\+psycopg://koopman:\*\*\*@") as info:
        open_storage(url, heartbeat=False)
    assert "s3cret" not in str(info.value)


class _FailsMidway:
    """A file body that gives some bytes, then fails as a full disk does."""

    def __init__(self) -> None:
        self._sent = False

    def read(self, size: int = -1) -> bytes:
        if not self._sent:
            self._sent = True
            return b"x" * 4096
        raise OSError(28, "No space left on device")


def test_a_failed_checkpoint_upload_leaves_no_partial_file_in_the_artifact_directory(tmp_path: Path) -> None:
    import errno
    import io

    from koopman_search.search.storage.artifacts import open_artifact_store

    store = open_artifact_store(str(tmp_path / "artifacts"))
    store.write("good", io.BytesIO(b"whole checkpoint"))
    with pytest.raises(OSError) as err:
        store.write("bad", _FailsMidway())
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["good"]
    with store.open_reader("good") as fh:
        assert fh.read() == b"whole checkpoint"
    store.write("good", io.BytesIO(b"replaced"))  # a rewrite replaces the file whole
    with store.open_reader("good") as fh:
        assert fh.read() == b"replaced"
