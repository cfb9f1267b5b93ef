"""One storage that retries: every call waits out a database outage with the fault model's policy.

    storage = RetryingStorage(open_rdb(url))           # what open_storage returns
    with storage_task("claim a trial"):                # optional: what the log line and the error name
        trial_id = storage.get_all_trials(...)         # retried, 1 s doubling to 30 s apart

A database restart or a network blip raises one of :data:`TRANSIENT`; the call is tried again, backing off,
until it succeeds or the outage timeout (``KOOPMAN_OUTAGE_TIMEOUT``, search/settings.py) has passed, then it raises
:class:`StorageError` (docs/design.md, "Fault model"). Any other error is raised at once. The storage is
wrapped once, at the outside (as Optuna wraps an RDB storage in its cache), so no call in the search is
left unretried and none is retried twice: a call made while another is being retried (the cache reading
through to the database) is not wrapped again.

The heartbeat thread alone calls the storage under the wrapper (:func:`unretried`): a beat that fails is
logged and the next beat tries again (:class:`~koopman_search.search.storage.database.Heartbeat`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.storages import BaseStorage

from koopman_search.search.errors import StorageError
from koopman_search.search.settings import runtime
from koopman_search.search.storage.optuna_private import BaseHeartbeat

__all__ = ["TRANSIENT", "RetryingStorage", "connect", "retrying", "storage_task", "unretried"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors a database restart or a network blip produces; anything else is a real error.
TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, optuna.exceptions.StorageInternalError)

# SQLite's answer to a write on a file opened read-only (or without write permission): not an outage
_READ_ONLY = ("readonly database", "read-only database")


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]


def _read_only(exc: BaseException) -> str | None:
    """The database's words when the error, or one it was raised from (Optuna wraps a failed commit in
    StorageInternalError), is a write refused by a read-only database; None otherwise."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if any(words in _first_line(seen) for words in _READ_ONLY):
            return _first_line(seen)
        seen = seen.__cause__ or seen.__context__
    return None


# How long a worker waits out a database outage before the operation fails (seconds). Long enough for a
# database restart or failover; a trial whose heartbeat went stale meanwhile is retried from its checkpoint
# (docs/design.md, "Fault model").
RETRY_DELAY_MAX = 30.0

# What the caller is doing, for the log line and the error ("claim a trial: database unreachable since ...");
# and its own limit, where it has one (a supervisor failing a dead child's trial waits 10 s, not 30 min).
_TASK: ContextVar[tuple[str, float | None] | None] = ContextVar("koopman_search_storage_task", default=None)


@contextmanager
def storage_task(what: str, timeout: float | None = None) -> Iterator[None]:
    """Name the storage calls made inside (``what``), and optionally give them their own outage limit."""
    token = _TASK.set((what, timeout))
    try:
        yield
    finally:
        _TASK.reset(token)


def retrying(
    fn: Callable[[], T],
    what: str,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``fn`` until it stops raising a transient database error, backing off (1 s doubling, at most
    :data:`RETRY_DELAY_MAX`) up to ``timeout`` s (default: the outage timeout), with one status line per
    attempt that says since when the database is unreachable. The time counted is the wall time since the
    first failure (a call that hangs before it fails counts too) or the pauses slept, whichever is longer."""
    limit = runtime().outage_timeout if timeout is None else timeout
    delay, slept, since = 1.0, 0.0, ""
    first: float | None = None
    while True:
        try:
            return fn()
        except TRANSIENT as exc:
            refused = _read_only(exc)
            if refused:  # no outage: waiting would not make the file writable
                raise StorageError(f"{what}: the database is read-only here ({refused})") from exc
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


def connect(engine: sqlalchemy.engine.Engine, what: str) -> sqlalchemy.engine.Connection:
    """A connection of ``engine`` (for a lock held in the database server), made through an outage."""
    return retrying(engine.connect, what)


# Every call of Optuna's storage interface (BaseStorage and BaseHeartbeat).
_RETRIED: Sequence[str] = (
    *(
        name
        for base in (BaseStorage, BaseHeartbeat)
        for name, value in vars(base).items()
        if callable(value) and not name.startswith("_")
    ),
    "_get_stale_trial_ids",
)

_inside = threading.local()  # a call being retried on this thread: calls it makes are not wrapped again


def _retried(name: str) -> Callable[..., Any]:
    def call(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.inner, name)
        if getattr(_inside, "depth", 0):
            return method(*args, **kwargs)
        task = _TASK.get()
        what, timeout = task if task is not None else (f"storage {name}", None)

        def once() -> Any:
            _inside.depth = getattr(_inside, "depth", 0) + 1
            try:
                return method(*args, **kwargs)
            finally:
                _inside.depth -= 1

        return retrying(once, what, timeout=timeout)

    call.__name__ = call.__qualname__ = name
    return call


# The retried calls, as a base class: defined before the storage interface's abstract methods are looked up.
_Retried = type("_Retried", (), {name: _retried(name) for name in _RETRIED})


class RetryingStorage(_Retried, BaseStorage, BaseHeartbeat):  # type: ignore[misc, valid-type]
    """``inner`` (Optuna's cached RDB storage, or the proxy's client) with every call retried through a
    database outage. Anything else (``engine``, ``heartbeat_interval``) is read from ``inner``, then from the
    database storage under it (:attr:`backend`)."""

    def __init__(self, inner: BaseStorage, backend: BaseStorage | None = None) -> None:
        self.inner = inner
        self.backend = backend if backend is not None else inner

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "backend"):  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        try:
            return getattr(self.inner, name)
        except AttributeError:
            return getattr(self.backend, name)

    def __repr__(self) -> str:
        return f"RetryingStorage({self.backend!r})"


def unretried(storage: BaseStorage) -> BaseStorage:
    """The storage under the wrapper (``storage`` itself when it is not wrapped): for a caller with its own
    policy for an outage, as the heartbeat thread has."""
    return storage.inner if isinstance(storage, RetryingStorage) else storage
