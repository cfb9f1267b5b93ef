"""Storage URLs → Optuna RDB storage with heartbeats, every call retried; a lock shared by the workers.

Studies are plain Optuna RDB studies, so ``optuna studies --storage URL`` and ``optuna-dashboard URL`` read
them directly. SQLite is the embedded default (nothing to start); PostgreSQL (``postgresql+psycopg://``)
serves several workers and machines.

Passwords never reach logs or errors: every message shows URLs through :func:`redact_url`.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from koopman_search.search.errors import StorageError
from koopman_search.search.settings import runtime
from koopman_search.search.storage import optuna_private
from koopman_search.search.storage.retry import TRANSIENT, RetryingStorage, connect, storage_task, unretried
from koopman_search.search.studyfile.urls import redact_text, redact_url

__all__ = [
    "MAX_RETRY",
    "Heartbeat",
    "exclusive",
    "fail_stale_trials",
    "open_storage",
]

logger = logging.getLogger(__name__)

# A running trial records a heartbeat this often (seconds); one silent for GRACE_FACTOR intervals is stale
# and is failed, then retried (RetryHeartbeatStaleTrialCallback) from its last checkpoint.
GRACE_FACTOR = 4
MAX_RETRY = 3  # retries of one trial after its worker died

CONNECT_TIMEOUT = 10  # seconds for a PostgreSQL connection to be made (libpq's connect_timeout)


def _sqlite_setup(engine: sqlalchemy.engine.Engine, read_only: bool = False) -> None:
    """Make SQLite safe for several processes: WAL journal, a busy timeout, and BEGIN IMMEDIATE so that a
    read-then-write transaction (popping a waiting trial) takes the write lock up front instead of failing
    with 'database is locked' when two workers race. ``read_only``: the busy timeout alone; the file's journal
    mode is left as it is (a reader must not turn a plain Optuna study's file into a WAL one)."""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" listener issue BEGIN itself
        cur = dbapi_conn.cursor()
        if not read_only:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed must not be reused


def read_only_url(url: str) -> str:
    """A SQLite URL that opens its file read-only (SQLite's ``mode=ro`` URI): nothing is written, not even a
    journal, so a file on a read-only mount or without write permission can be read. Others are unchanged."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return url
    path = Path(parsed.database).resolve().as_posix()
    return f"sqlite:///file:{quote(path)}?mode=ro&uri=true"


# Workers that open a fresh database together all try to create Optuna's tables; the losers of that race
# get a duplicate-key or duplicate-table error (SQLite: "table ... already exists"), and a second attempt
# finds the tables in place.
SCHEMA_RACE_ATTEMPTS = 3


def _lost_schema_race(exc: sqlalchemy.exc.DBAPIError) -> bool:
    if isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)):
        return True
    return "already exists" in str(exc.orig)


def _create_rdb_storage(url: str, kwargs: dict[str, Any]) -> RDBStorage:
    attempt = 1
    while True:
        try:
            return RDBStorage(url, **kwargs)
        except sqlalchemy.exc.DBAPIError as exc:
            if attempt >= SCHEMA_RACE_ATTEMPTS or not _lost_schema_race(exc):
                raise
            logger.debug(
                "creating the tables of %s raced with another worker (%s); trying again",
                redact_url(url),
                type(exc).__name__,
            )
            time.sleep(0.2 * attempt)
            attempt += 1


def engine_kwargs(url: str) -> dict[str, Any]:
    """SQLAlchemy engine settings for ``url``: connections checked before use (``pool_pre_ping``) so that
    workers survive a database restart; SQLite waits 60 s for a lock; a server database recycles connections
    and, for PostgreSQL, gives up a connection attempt after :data:`CONNECT_TIMEOUT` s (unless the URL sets
    ``connect_timeout``), so the outage retry, not a hung call, decides how long to wait."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}
        return kwargs
    kwargs["pool_recycle"] = 300
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    return kwargs


def open_storage(
    url: str, heartbeat: bool = True, heartbeat_interval: int | None = None, read_only: bool = False
) -> RetryingStorage:
    """Open (and create the tables of) the RDB storage at ``url``, in Optuna's cache, every call retried
    through a database outage (search/storage/retry.py).

    With ``heartbeat``, running trials record heartbeats and a stale trial is failed and retried up to
    :data:`MAX_RETRY` times. Connections are checked before use (``pool_pre_ping``) so that workers
    survive a database restart. ``grpc://HOST:PORT`` is a storage proxy in front of the database instead.
    ``read_only`` (the commands that only read: status, best, recommend, report) opens a SQLite file read-only
    and leaves its journal mode as it is.
    """
    interval = heartbeat_interval or runtime().heartbeat_interval
    if url.startswith("grpc://"):  # workers behind `koopman-search storage-proxy` (search/storage/proxy.py)
        from koopman_search.search.storage.proxy_client import open_proxy_storage

        return RetryingStorage(open_proxy_storage(url, heartbeat=heartbeat, heartbeat_interval=interval))
    shown = url
    if url.startswith("sqlite") and read_only:
        url = read_only_url(url)
    elif url.startswith("sqlite"):
        db = sqlalchemy.engine.make_url(url).database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"engine_kwargs": engine_kwargs(url)}
    try:
        with warnings.catch_warnings():
            # Optuna marks heartbeats and their retry callback experimental; they are the design here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if heartbeat:
                kwargs.update(
                    heartbeat_interval=interval,
                    grace_period=GRACE_FACTOR * interval,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                )
            storage = _create_rdb_storage(url, kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError, ValueError) as exc:
        detail = redact_text(str(getattr(exc, "orig", None) or exc).strip().splitlines()[0], url)
        raise StorageError(
            f"cannot open storage {redact_url(shown)}: {detail}; check that the database server is up and "
            "the URL is right (see --storage / OPTUNA_STORAGE)"
        ) from None
    if url.startswith("sqlite"):
        _sqlite_setup(storage.engine, read_only=read_only)
    return RetryingStorage(optuna_private.cached(storage), storage)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the study's trials whose heartbeat went silent (their retry is queued by the storage's
    RetryHeartbeatStaleTrialCallback). Optuna marks this function experimental; its behaviour is what
    the heartbeat design documents."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        with storage_task("check stale trials"):
            optuna.storages.fail_stale_trials(study)


class Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds on a daemon thread, and tolerates a
    database that is briefly down (the next beat retries)."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval: float | None = None) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval or storage.heartbeat_interval or runtime().heartbeat_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)
        self.errors = 0  # beats that failed with an error that is not a database outage

    def _beat(self) -> None:
        while True:
            try:
                unretried(self._storage).record_heartbeat(self._trial_id)  # type: ignore[attr-defined]
            except TRANSIENT as exc:
                logger.warning("heartbeat of trial id %d not recorded: %s", self._trial_id, type(exc).__name__)
            except Exception as exc:
                # Any other error must not end the thread: the trial would look stale and be failed and
                # retried elsewhere while it still runs here. The next beat tries again.
                self.errors += 1
                log = logger.warning if self.errors == 1 else logger.debug
                log("heartbeat of trial id %d not recorded (%d so far): %r", self._trial_id, self.errors, exc)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> Heartbeat:
        if self._storage.heartbeat_interval is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


_UNLOCKED: set[str] = set()


def _is_proxy(storage: Any) -> bool:
    try:
        from optuna.storages import GrpcStorageProxy
    except ImportError:  # grpcio is an optional extra: then no storage is a proxy
        return False
    return isinstance(storage, GrpcStorageProxy)


def _warn_unlocked(name: str) -> None:
    kind = name.split(" ")[1] if name.count(" ") else name  # "koopman-search warmup ...": "warmup"
    if kind in _UNLOCKED:
        return
    _UNLOCKED.add(kind)
    logger.warning(
        "no lock behind the storage proxy: %r runs unlocked (two workers may decide one asha rung at the same "
        "moment, or rebuild one warmup checkpoint twice); nothing is lost, but run create and launch against "
        "the database itself",
        name,
    )


@contextmanager
def exclusive(storage: Any, name: str) -> Iterator[None]:
    """Hold a lock named ``name`` across processes and machines that share ``storage``, for a short
    read-then-write that must not interleave (topping up a study's trial queue). PostgreSQL and MySQL lock
    in the server; SQLite locks a small file beside the database (``<db>.lock``). A lock dies with its
    holder's connection, so a crashed worker never leaves it held, and the connection holds no transaction
    open meanwhile (autocommit): the lock may be held for minutes (a warmup rebuild trains under it). Behind
    the storage proxy nothing can be locked: that is said once per lock name, and the work runs unlocked.
    Other storages (in memory) are not locked."""
    database = optuna_private.database_of(storage)
    engine: sqlalchemy.engine.Engine | None = getattr(database, "engine", None)
    if engine is None:
        if _is_proxy(database):
            _warn_unlocked(name)
        yield
        return
    dialect = engine.dialect.name
    if dialect == "postgresql":
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
        with connect(engine, f"lock {name}") as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    elif dialect in ("mysql", "mariadb"):
        with connect(engine, f"lock {name}") as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:name, -1)"), {"name": name[:64]})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:name)"), {"name": name[:64]})
    elif dialect == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        lock = sqlite3.connect(f"{engine.url.database}.lock", timeout=60.0, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            yield
        finally:
            lock.close()  # ends the transaction, and with it the lock
    else:
        yield
