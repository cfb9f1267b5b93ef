"""Optuna's gRPC storage proxy in front of the study's database, for many workers on one database.

``koopman-search storage-proxy --storage postgresql+psycopg://...`` serves the study's database over gRPC
(:func:`serve`); workers then use ``--storage grpc://HOST:PORT`` (:func:`open_proxy_storage`), and only the
proxy holds database connections: a bounded pool (at most ``threads`` requests at a time) instead of one
pool per worker process.

What goes through the proxy, and how:

* every storage call of Optuna's ``GrpcStorageProxy`` client (trials, params, user and system attrs,
  states, study attrs, enqueueing): the proxy runs it on Optuna's cached RDB storage;
* claiming a WAITING trial: the client asks the proxy to set WAITING → RUNNING, and the database does the
  compare-and-set, so two workers never claim the same trial (the same call as on the database directly);
* heartbeats: Optuna's client has none, so the workers' client sends each beat as a reserved trial system
  attr (:data:`HEARTBEAT_KEY`) that this proxy turns into ``record_heartbeat`` on the database (it is never
  stored); the proxy itself fails stale trials every heartbeat interval and queues their retries
  (``RetryHeartbeatStaleTrialCallback``), which workers behind a proxy cannot do themselves.

What does not, and is done on the database directly: ``create`` (it tops up the trial budget under a
database lock, see ``search.storage.database.exclusive``, which the gRPC protocol cannot hold), the dashboard and
``report`` (they read whole studies and write notes; no gain from the proxy), and ``delete_study``. The
proxy speaks plain gRPC without TLS or authentication: keep it on a private network (a cluster-internal
Service, a node's loopback). Workers and the proxy must use the same heartbeat interval
(``KOOPMAN_HEARTBEAT_INTERVAL``, default 30 s). See README.md, "Many workers: the storage proxy".
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna
from optuna.storages import BaseStorage

from koopman_search.search.errors import SpecError, StorageError
from koopman_search.search.settings import runtime
from koopman_search.search.storage import optuna_private
from koopman_search.search.storage.database import GRACE_FACTOR, open_storage
from koopman_search.search.storage.proxy_client import (
    DEFAULT_PORT,
    HEARTBEAT_KEY,
    _grpc,
    is_proxy_url,
    open_proxy_storage,
    parse_proxy_url,
)
from koopman_search.search.storage.retry import TRANSIENT
from koopman_search.search.studyfile.urls import redact_url

__all__ = [
    "DEFAULT_PORT",
    "HEARTBEAT_KEY",
    "is_proxy_url",
    "make_server",
    "open_proxy_storage",
    "parse_proxy_url",
    "serve",
]

logger = logging.getLogger(__name__)


# ---- the proxy side --------------------------------------------------------------------------------------


def _servicer_class(grpc: Any) -> type:
    """Optuna's servicer, plus heartbeats, and database outages answered as UNAVAILABLE (the workers retry)
    instead of UNKNOWN."""

    def transient_as_unavailable(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, request: Any, context: Any) -> Any:
            try:
                return method(self, request, context)
            except TRANSIENT as exc:
                logger.warning("database unreachable during %s: %s", method.__name__, type(exc).__name__)
                context.abort(code=grpc.StatusCode.UNAVAILABLE, details=f"database: {type(exc).__name__}")

        call.__name__ = method.__name__
        return call

    return optuna_private.proxy_servicer_class(grpc, HEARTBEAT_KEY, transient_as_unavailable)


def make_server(storage: BaseStorage, host: str, port: int, threads: int) -> tuple[Any, int]:
    """A gRPC server (not started) for ``storage`` on ``host:port`` (0: a free port), ``threads`` requests at
    a time, and the port it listens on."""
    grpc = _grpc()
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="proxy"),
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    optuna_private.add_servicer(_servicer_class(grpc)(storage), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise StorageError(f"storage proxy: cannot listen on {host}:{port} (in use, or not an address here)")
    return server, bound


def _sweep_stale_trials(storage: BaseStorage, stop: threading.Event, every: float) -> None:
    """Fail the stale trials of every study, and queue their retries, every ``every`` seconds."""
    while not stop.wait(every):
        try:
            for frozen in storage.get_all_studies():
                study = optuna.load_study(storage=storage, study_name=frozen.study_name)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
        except TRANSIENT as exc:
            logger.warning("stale-trial check skipped: database unreachable (%s)", type(exc).__name__)


def serve(
    database_url: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    threads: int = 16,
    heartbeat_interval: int | None = None,
    ready: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Serve the database at ``database_url`` to workers until SIGTERM/SIGINT (or ``stop``). Returns 0."""
    if is_proxy_url(database_url):
        raise SpecError(
            f"storage-proxy serves a database, not another proxy, but got storage={database_url!r}; "
            "give it the postgresql+psycopg:// URL"
        )
    interval = heartbeat_interval or runtime().heartbeat_interval
    rdb = open_storage(database_url, heartbeat=True, heartbeat_interval=interval)
    # Optuna's cache: finished trials are read once, so a claim reads only the unfinished ones
    storage = optuna_private.cached(rdb)
    server, port = make_server(storage, host, port, threads)
    stop = stop or threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    server.start()
    sweeper = threading.Thread(
        target=_sweep_stale_trials, args=(storage, stop, float(interval)), name="stale-trials", daemon=True
    )
    sweeper.start()
    logger.info(
        "storage proxy for %s listening on %s:%d (%d threads, heartbeat %d s, stale after %d s)",
        redact_url(database_url),
        host,
        port,
        threads,
        interval,
        GRACE_FACTOR * interval,
    )
    if ready is not None:
        ready(port)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop(grace=5).wait()
        rdb.engine.dispose()
        logger.info("storage proxy stopped")
    return 0
