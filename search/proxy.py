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
database lock, see ``search.storage.exclusive``, which the gRPC protocol cannot hold), the dashboard and
``report`` (they read whole studies and write notes; no gain from the proxy), and ``delete_study``. The
proxy speaks plain gRPC without TLS or authentication: keep it on a private network (a cluster-internal
Service, a node's loopback). Workers and the proxy must use the same heartbeat interval
(``KOOPMAN_HEARTBEAT_INTERVAL``, default 30 s). See README.md, "Many workers: the storage proxy".
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast
from urllib.parse import urlsplit

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial

from search.errors import SpecError, StorageError
from search.storage import GRACE_FACTOR, HEARTBEAT_INTERVAL, TRANSIENT, open_storage
from search.urls import redact_url

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

SCHEME = "grpc"
DEFAULT_PORT = 13000
HEARTBEAT_KEY = "koopman-search:heartbeat"  # a reserved trial system attr: a beat, never stored
INSTALL_HINT = "the storage proxy needs grpcio: pip install 'koopman-search[grpc]'"
# gRPC status codes that mean "the proxy (or its database) is out of reach for now": retried by
# search.storage.retrying like a database restart.
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def is_proxy_url(url: str) -> bool:
    return url.startswith(f"{SCHEME}://")


def parse_proxy_url(url: str) -> tuple[str, int]:
    """``grpc://HOST:PORT`` → ``(host, port)``; the port defaults to :data:`DEFAULT_PORT`."""
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        port = -1
    if parts.scheme != SCHEME or not parts.hostname or port < 1 or parts.path not in ("", "/") or parts.query:
        raise SpecError(
            f"a storage proxy URL must look like grpc://HOST:PORT (e.g. grpc://koopman-proxy:"
            f"{DEFAULT_PORT}), but got storage={url!r}"
        )
    return parts.hostname, port


def _grpc() -> Any:
    try:
        import grpc
    except ImportError:
        raise StorageError(INSTALL_HINT) from None
    return grpc


# ---- the worker side -------------------------------------------------------------------------------------


class _TransientStub:
    """Optuna's gRPC stub, with "proxy unreachable" errors raised as StorageInternalError: a transient error
    for search.storage.retrying, as a database restart is on a direct connection."""

    def __init__(self, stub: Any, grpc: Any) -> None:
        self._stub = stub
        self._codes = {getattr(grpc.StatusCode, name) for name in _TRANSIENT_CODES}
        self._error = grpc.RpcError

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except self._error as exc:
                code = exc.code() if callable(getattr(exc, "code", None)) else None
                if code in self._codes:
                    raise optuna.exceptions.StorageInternalError(
                        f"storage proxy {name}: {getattr(code, 'name', code)}: {exc.details()}"
                    ) from exc
                raise

        return call


@functools.cache
def _proxy_class() -> type:
    """The workers' storage behind ``koopman-search storage-proxy``: Optuna's ``GrpcStorageProxy`` client plus
    heartbeats (sent as :data:`HEARTBEAT_KEY`), with "proxy unreachable" raised as a transient error. Made
    here, not at import, because grpcio is an optional extra."""
    grpc = _grpc()
    from optuna.storages import GrpcStorageProxy
    from optuna.storages._grpc.client import GrpcClientCache

    class _ProxyStorage(GrpcStorageProxy, BaseHeartbeat):
        def __init__(self, *, host: str, port: int, heartbeat_interval: int | None) -> None:
            self.heartbeat_interval = heartbeat_interval
            super().__init__(host=host, port=port)

        def _setup(self) -> None:
            super()._setup()
            self._stub = cast(Any, _TransientStub(self._stub, grpc))
            self._cache = GrpcClientCache(self._stub)

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, None)

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            return []  # the proxy fails stale trials itself (serve)

        def get_heartbeat_interval(self) -> int | None:
            return self.heartbeat_interval

        def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
            return None

    return _ProxyStorage


def open_proxy_storage(
    url: str, heartbeat: bool = True, heartbeat_interval: int | None = None, timeout: float = 60.0
) -> Any:
    """The storage proxy at ``grpc://HOST:PORT``, once it answers (waits up to ``timeout`` s)."""
    host, port = parse_proxy_url(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = _proxy_class()(
            host=host, port=port, heartbeat_interval=(heartbeat_interval or HEARTBEAT_INTERVAL) if heartbeat else None
        )
    try:
        storage.wait_server_ready(timeout=timeout)
    except ConnectionError:
        storage.close()
        raise StorageError(
            f"cannot reach the storage proxy {url} within {timeout:.0f} s; check that "
            "`koopman-search storage-proxy` runs there (see --storage / OPTUNA_STORAGE)"
        ) from None
    return storage


# ---- the proxy side --------------------------------------------------------------------------------------


def _servicer_class(grpc: Any) -> type:
    from optuna.storages._grpc.auto_generated import api_pb2
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    class Servicer(OptunaStorageProxyService):
        """Optuna's servicer, plus heartbeats, and database outages answered as UNAVAILABLE (the workers
        retry) instead of UNKNOWN."""

        def SetTrialSystemAttribute(self, request: Any, context: Any) -> Any:
            if request.key != HEARTBEAT_KEY:
                return super().SetTrialSystemAttribute(request, context)
            try:
                cast(Any, self._backend).record_heartbeat(request.trial_id)
            except KeyError as exc:
                context.abort(code=grpc.StatusCode.NOT_FOUND, details=str(exc))
            return api_pb2.SetTrialSystemAttributeReply()

    def transient_as_unavailable(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, request: Any, context: Any) -> Any:
            try:
                return method(self, request, context)
            except TRANSIENT as exc:
                logger.warning("database unreachable during %s: %s", method.__name__, type(exc).__name__)
                context.abort(code=grpc.StatusCode.UNAVAILABLE, details=f"database: {type(exc).__name__}")

        call.__name__ = method.__name__
        return call

    for name in dir(OptunaStorageProxyService):
        if name[:1].isupper() and callable(getattr(OptunaStorageProxyService, name)):
            setattr(Servicer, name, transient_as_unavailable(getattr(Servicer, name)))
    return Servicer


def make_server(storage: BaseStorage, host: str, port: int, threads: int) -> tuple[Any, int]:
    """A gRPC server (not started) for ``storage`` on ``host:port`` (0: a free port), ``threads`` requests at
    a time, and the port it listens on."""
    grpc = _grpc()
    from optuna.storages._grpc.auto_generated import api_pb2_grpc

    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="proxy"),
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    api_pb2_grpc.add_StorageServiceServicer_to_server(_servicer_class(grpc)(storage), server)
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
    interval = heartbeat_interval or HEARTBEAT_INTERVAL
    rdb = open_storage(database_url, heartbeat=True, heartbeat_interval=interval)
    # Optuna's cache: finished trials are read once, so a claim reads only the unfinished ones
    storage = optuna.storages._CachedStorage(rdb)
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
