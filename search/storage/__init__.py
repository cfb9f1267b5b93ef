"""Storage: opening the study's database (database.py) with every call retried through an outage
(retry.py), the artifact store for checkpoints (artifacts.py), the gRPC proxy for many workers on one
database (proxy.py, proxy_client.py), the stored layout, every key the search writes (layout.py), and
Optuna's private names, in one adapter (optuna_private.py).

    storage = open_storage("sqlite:///runs/study.db")     # Optuna's cache, retried; heartbeats on
    store = open_artifact_store("runs/artifacts")
    with exclusive(storage, "a lock name"): ...            # across processes and machines
"""

from __future__ import annotations

from koopman_search.search.storage.artifacts import check_artifacts, open_artifact_store
from koopman_search.search.storage.database import (
    MAX_RETRY,
    Heartbeat,
    exclusive,
    fail_stale_trials,
    open_storage,
)
from koopman_search.search.storage.retry import TRANSIENT, RetryingStorage, storage_task

__all__ = [
    "MAX_RETRY",
    "TRANSIENT",
    "Heartbeat",
    "RetryingStorage",
    "check_artifacts",
    "exclusive",
    "fail_stale_trials",
    "open_artifact_store",
    "open_storage",
    "storage_task",
]
