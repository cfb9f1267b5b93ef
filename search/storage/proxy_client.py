"""The workers' side of the storage proxy (search/storage/proxy.py): ``grpc://HOST:PORT`` URLs, and Optuna's
``GrpcStorageProxy`` client with heartbeats sent as a reserved trial system attr (:data:`HEARTBEAT_KEY`).

Apart from the proxy server so that ``search.storage.database`` can open a proxy URL without importing the server,
which itself opens the database through ``koopman_search.search.storage.database``.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import optuna

from koopman_search.search.errors import SpecError, StorageError
from koopman_search.search.storage import optuna_private

__all__ = ["DEFAULT_PORT", "HEARTBEAT_KEY", "is_proxy_url", "open_proxy_storage", "parse_proxy_url"]

logger = logging.getLogger(__name__)

SCHEME = "grpc"
DEFAULT_PORT = 13000
HEARTBEAT_KEY = "koopman-search:heartbeat"  # a reserved trial system attr: a beat, never stored
INSTALL_HINT = "the storage proxy needs grpcio: pip install 'koopman-search[grpc]'"
# gRPC status codes that mean "the proxy (or its database) is out of reach for now": retried by
# koopman_search.search.storage.retry.retrying like a database restart.
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
    for koopman_search.search.storage.retry.retrying, as a database restart is on a direct connection."""

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
    return optuna_private.proxy_client_class(HEARTBEAT_KEY, lambda stub: _TransientStub(stub, grpc))


def open_proxy_storage(
    url: str, heartbeat: bool = True, heartbeat_interval: int | None = None, timeout: float = 60.0
) -> Any:
    """The storage proxy at ``grpc://HOST:PORT``, once it answers (waits up to ``timeout`` s). With ``heartbeat``
    and a ``heartbeat_interval`` (``search.storage.database.open_storage`` passes the study's, which must be the
    proxy's), running trials send a heartbeat every that many seconds."""
    host, port = parse_proxy_url(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = _proxy_class()(
            host=host, port=port, heartbeat_interval=heartbeat_interval if heartbeat and heartbeat_interval else None
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
