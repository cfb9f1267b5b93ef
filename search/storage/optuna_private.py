"""Every use of Optuna's private names, in one place (Optuna is pinned below its next major version).

Optuna gives no public way to reach a study's storage and ids, a trial's id, the cache it wraps an RDB storage
in, a file store's path, or the gRPC proxy's servicer and client internals; the search needs each. When Optuna
changes one of them, this module is the one to change (docs/design.md, "Where things live").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "BaseHeartbeat",
    "add_servicer",
    "artifact_path",
    "cached",
    "database_of",
    "proxy_client_class",
    "proxy_servicer_class",
    "storage_of",
    "study_id_of",
    "study_with_trials",
    "trial_id_of",
]


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study reads and writes through (with the search's storages, the retrying one)."""
    return cast(BaseStorage, study._storage)


def study_id_of(study: optuna.Study) -> int:
    return int(study._study_id)


def trial_id_of(trial: optuna.Trial | FrozenTrial | Any) -> int:
    """A trial's id in its storage (not its number in the study), for a live or a frozen trial."""
    return int(trial._trial_id)


def cached(rdb: RDBStorage) -> BaseStorage:
    """Optuna's cache around an RDB storage, as ``optuna.load_study(storage=rdb)`` would make: finished
    trials are read from the database once."""
    return cast(BaseStorage, optuna.storages._CachedStorage(rdb))


def database_of(storage: Any) -> Any:
    """The RDB storage under the search's retrying wrapper and Optuna's cache (or ``storage`` itself)."""
    storage = getattr(storage, "backend", storage)  # search/storage/retry.py, RetryingStorage
    return getattr(storage, "_backend", storage)  # Optuna's cache


def artifact_path(store: optuna.artifacts.FileSystemArtifactStore, artifact_id: str) -> str:
    """Where a file artifact store keeps ``artifact_id`` (its own check of the id included)."""
    return str(store._get_filepath(artifact_id))


# ---- the gRPC storage proxy ------------------------------------------------------------------------------


def add_servicer(servicer: Any, server: Any) -> None:
    from optuna.storages._grpc.auto_generated import api_pb2_grpc

    api_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server)


def proxy_servicer_class(
    grpc: Any, heartbeat_key: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> type:
    """Optuna's servicer that turns a system attr ``heartbeat_key`` into ``record_heartbeat`` on the database,
    with every RPC method wrapped by ``wrap``."""
    from optuna.storages._grpc.auto_generated import api_pb2
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    class Servicer(OptunaStorageProxyService):
        def SetTrialSystemAttribute(self, request: Any, context: Any) -> Any:
            if request.key != heartbeat_key:
                return super().SetTrialSystemAttribute(request, context)
            try:
                cast(Any, self._backend).record_heartbeat(request.trial_id)
            except KeyError as exc:
                context.abort(code=grpc.StatusCode.NOT_FOUND, details=str(exc))
            return api_pb2.SetTrialSystemAttributeReply()

    for name in dir(OptunaStorageProxyService):
        if name[:1].isupper() and callable(getattr(OptunaStorageProxyService, name)):
            setattr(Servicer, name, wrap(getattr(Servicer, name)))
    return Servicer


def proxy_client_class(heartbeat_key: str, wrap_stub: Callable[[Any], Any]) -> type:
    """Optuna's ``GrpcStorageProxy`` client plus heartbeats (sent as the system attr ``heartbeat_key``), its
    stub wrapped by ``wrap_stub``. Stale trials are failed by the proxy itself, never by a client."""
    from optuna.storages import GrpcStorageProxy
    from optuna.storages._grpc.client import GrpcClientCache

    class ProxyStorage(GrpcStorageProxy, BaseHeartbeat):
        def __init__(self, *, host: str, port: int, heartbeat_interval: int | None) -> None:
            self.heartbeat_interval = heartbeat_interval
            super().__init__(host=host, port=port)

        def _setup(self) -> None:
            super()._setup()
            self._stub = cast(Any, wrap_stub(self._stub))
            self._cache = GrpcClientCache(self._stub)

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, heartbeat_key, None)

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            return []  # the proxy fails stale trials itself (search/storage/proxy.py, serve)

        def get_heartbeat_interval(self) -> int | None:
            return self.heartbeat_interval

        def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
            return None

    return ProxyStorage


class _StudyWithTrials:
    """A study whose trials are the given list, as Optuna's TPE reads them (``study._get_trials``)."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        self._study = study
        self._trials = trials

    def _get_trials(
        self, deepcopy: bool = True, states: Iterable[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        wanted = None if states is None else tuple(states)
        return [t for t in self._trials if wanted is None or t.state in wanted]

    def get_trials(self, deepcopy: bool = True, states: Iterable[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return list(self._trials)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def study_with_trials(study: optuna.Study, trials: list[FrozenTrial]) -> Any:
    """``study`` for a sampler's call, but with ``trials`` in place of its own (the rest is the study's:
    directions, storage, ...). Optuna's TPE reads a study's trials through the private ``_get_trials``."""
    return _StudyWithTrials(study, trials)
