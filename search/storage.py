"""Storage URLs → Optuna RDB storage with heartbeats; the artifact store for checkpoints; retries.

Studies are plain Optuna RDB studies, so ``optuna studies --storage URL`` and ``optuna-dashboard URL`` read
them directly. SQLite is the embedded default (nothing to start); PostgreSQL (``postgresql+psycopg://``)
serves several workers and machines.

Passwords never reach logs or errors: every message shows URLs through :func:`redact_url`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from search.errors import StorageError
from search.settings import env_setting
from search.urls import redact_text, redact_url
from trainer.checkpoint import probe_dir
from trainer.errors import ConfigError

__all__ = [
    "HEARTBEAT_INTERVAL",
    "MAX_RETRY",
    "OUTAGE_TIMEOUT",
    "Heartbeat",
    "exclusive",
    "fail_stale_trials",
    "open_artifact_store",
    "open_storage",
    "retrying",
]

logger = logging.getLogger(__name__)

# A running trial records a heartbeat this often (seconds); one silent for GRACE_FACTOR intervals is stale
# and is failed, then retried (RetryHeartbeatStaleTrialCallback) from its last checkpoint.
HEARTBEAT_INTERVAL = int(env_setting("KOOPMAN_HEARTBEAT_INTERVAL"))  # search/settings.py
GRACE_FACTOR = 4
MAX_RETRY = 3  # retries of one trial after its worker died

T = TypeVar("T")


def _sqlite_setup(engine: sqlalchemy.engine.Engine) -> None:
    """Make SQLite safe for several processes: WAL journal, a busy timeout, and BEGIN IMMEDIATE so that a
    read-then-write transaction (popping a waiting trial) takes the write lock up front instead of failing
    with 'database is locked' when two workers race."""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" listener issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed must not be reused


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


def open_storage(url: str, heartbeat: bool = True, heartbeat_interval: int | None = None) -> RDBStorage:
    """Open (and create the tables of) the RDB storage at ``url``.

    With ``heartbeat``, running trials record heartbeats and a stale trial is failed and retried up to
    :data:`MAX_RETRY` times. Connections are checked before use (``pool_pre_ping``) so that workers
    survive a database restart. ``grpc://HOST:PORT`` is a storage proxy in front of the database instead.
    """
    interval = heartbeat_interval or HEARTBEAT_INTERVAL
    if url.startswith("grpc://"):  # workers behind `koopman-search storage-proxy` (search/proxy.py)
        from search.proxy_client import open_proxy_storage

        return open_proxy_storage(url, heartbeat=heartbeat, heartbeat_interval=interval)
    if url.startswith("sqlite"):
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
            f"cannot open storage {redact_url(url)}: {detail}; check that the database server is up and "
            "the URL is right (see --storage / OPTUNA_STORAGE)"
        ) from None
    if url.startswith("sqlite"):
        _sqlite_setup(storage.engine)
    return storage


def open_artifact_store(location: str) -> optuna.artifacts.FileSystemArtifactStore | Any:
    """The artifact store for checkpoints: a directory shared by the workers, or ``s3://bucket/prefix``
    (needs boto3; endpoint from ``AWS_ENDPOINT_URL`` for S3-compatible stores)."""
    if location.startswith("s3://"):
        try:
            import boto3
        except ImportError:
            raise StorageError(f"artifact store {location} needs boto3: pip install 'koopman-search[s3]'") from None
        bucket, _, prefix = location[len("s3://") :].partition("/")
        from optuna.artifacts import Boto3ArtifactStore

        store = Boto3ArtifactStore(bucket, client=boto3.client("s3"))
        if prefix:
            logger.warning(
                "artifact store %s: the prefix %r is ignored by Optuna's Boto3ArtifactStore", location, prefix
            )
        return store
    path = Path(location)
    path.mkdir(parents=True, exist_ok=True)
    return AtomicFileSystemArtifactStore(str(path))


def check_artifacts(location: str) -> None:
    """Raise :class:`ConfigError` (bad input, exit 2) unless ``location`` is a directory this process can
    create and write to (an ``s3://`` store is checked when it is opened). Commands call this before they
    write to the database, so a bad ``artifacts`` leaves nothing behind."""
    if location.startswith("s3://"):
        return
    path = Path(location)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"artifacts must be a directory, but got artifacts={location!r}, which is a file; "
            "give a directory (it is created when missing)"
        )
    try:
        probe_dir(path)
    except OSError as exc:
        raise ConfigError(
            f"artifacts must be a directory this process can write to, but got artifacts={location!r} "
            f"({exc.strerror or exc}); give a writable directory"
        ) from None


class AtomicFileSystemArtifactStore(optuna.artifacts.FileSystemArtifactStore):
    """Optuna's directory store, writing each artifact to a temporary name beside it and renaming it into
    place once it is whole and on disk: a write that fails (a full disk, a killed worker) leaves no partial
    file under the artifact's name, and the temporary one is removed when the failure is an exception."""

    def write(self, artifact_id: str, content_body: Any) -> None:
        target = Path(self._get_filepath(artifact_id))
        # a directory removed while the study runs is the environment's fault: make it again and go on
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                shutil.copyfileobj(content_body, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# Errors a database restart or a network blip produces; anything else is a real error.
TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, optuna.exceptions.StorageInternalError)


# How long a worker waits out a database outage before the operation fails (seconds). Long enough for a
# database restart or failover; a trial whose heartbeat went stale meanwhile is retried from its checkpoint
# (docs/design.md, "Fault model").
OUTAGE_TIMEOUT = float(env_setting("KOOPMAN_OUTAGE_TIMEOUT"))
RETRY_DELAY_MAX = 30.0
CONNECT_TIMEOUT = 10  # seconds for a PostgreSQL connection to be made (libpq's connect_timeout)


def retrying(
    fn: Callable[[], T],
    what: str,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn`` until it stops raising a transient database error, backing off (1 s doubling, at most
    :data:`RETRY_DELAY_MAX`) up to ``timeout`` s (default :data:`OUTAGE_TIMEOUT`), with one status line per
    attempt that says since when the database is unreachable. The time counted is the wall time since the
    first failure (a call that hangs before it fails counts too) or the pauses slept, whichever is longer."""
    limit = OUTAGE_TIMEOUT if timeout is None else timeout
    delay, slept, since = 1.0, 0.0, ""
    first: float | None = None
    while True:
        try:
            return fn()
        except TRANSIENT as exc:
            now = clock()
            first = now if first is None else first
            waited = max(slept, now - first)
            if waited >= limit:
                raise StorageError(f"{what}: the database stayed unreachable for {waited:.0f} s") from exc
            since = since or time.strftime("%H:%M:%S")
            logger.warning(
                "%s: database unreachable since %s (%s), retrying in %.0f s (gives up after %.0f s)",
                what,
                since,
                type(exc).__name__,
                delay,
                limit,
            )
            sleep(delay)
            slept += delay
            delay = min(delay * 2, RETRY_DELAY_MAX)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the study's trials whose heartbeat went silent (their retry is queued by the storage's
    RetryHeartbeatStaleTrialCallback). Optuna marks this function experimental; its behaviour is what
    the heartbeat design documents."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retrying(lambda: optuna.storages.fail_stale_trials(study), "check stale trials")


class Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds on a daemon thread, and tolerates a
    database that is briefly down (the next beat retries)."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval: float | None = None) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval or storage.heartbeat_interval or HEARTBEAT_INTERVAL
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)
        self.errors = 0  # beats that failed with an error that is not a database outage

    def _beat(self) -> None:
        while True:
            try:
                self._storage.record_heartbeat(self._trial_id)
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


@contextmanager
def exclusive(storage: Any, name: str) -> Iterator[None]:
    """Hold a lock named ``name`` across processes and machines that share ``storage``, for a short
    read-then-write that must not interleave (topping up a study's trial queue). PostgreSQL and MySQL lock
    in the server; SQLite locks a small file beside the database (``<db>.lock``). A lock dies with its
    holder's connection, so a crashed worker never leaves it held. Other storages are not locked."""
    backend = getattr(storage, "_backend", storage)  # optuna wraps an RDBStorage in a cache
    engine: sqlalchemy.engine.Engine | None = getattr(backend, "engine", None)
    if engine is None:
        yield
        return
    dialect = engine.dialect.name
    if dialect == "postgresql":
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    elif dialect in ("mysql", "mariadb"):
        with engine.connect() as conn:
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
