"""optuna-dashboard's WSGI app, with two of its JSON answers changed for koopman-search studies.

optuna-dashboard has no setting for either, and both are what a person meets first:

- **The study list** (``GET /api/studies``). The dashboard lists studies newest first and shows only a study's
  name and directions, so a baseline companion (``<study>.baseline-seed<N>``, created when the study's first
  worker starts) came first, as a peer of the study. Here each companion is placed right after the study it
  belongs to, and its name reads ``<name> (baseline of <study>, not a search)``. The study's own page, its id and
  its stored name are unchanged.
- **Hyperparameter importance** (``GET /api/studies/<id>/param_importances``). The dashboard fits it on any
  number of complete trials; below :data:`MIN_TRIALS_FOR_IMPORTANCE` (the report's threshold) the fit is noise,
  so the answer is empty there and the plot draws no bars. The study note says why.

Every other request goes to optuna-dashboard untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

import optuna
from optuna.trial import TrialState

from koopman_search.search.review.summary import MIN_TRIALS_FOR_IMPORTANCE
from koopman_search.search.storage.layout import BASELINE_ROLE_PREFIX, ROLE_ATTR

__all__ = ["ReviewApp", "list_label", "order_studies", "storage_for"]

_IMPORTANCE_PATH = re.compile(r"/api/studies/(\d+)/param_importances")

StartResponse = Callable[..., Any]


def _companion_of(summary: dict[str, Any]) -> str | None:
    """The name of the study that a listed study is the baseline companion of, or None."""
    for attr in summary.get("user_attrs") or []:  # the dashboard sends attrs as [{"key": ..., "value": ...}]
        role = attr.get("value") if isinstance(attr, dict) and attr.get("key") == ROLE_ATTR else None
        if isinstance(role, str) and role.startswith(BASELINE_ROLE_PREFIX):
            return role[len(BASELINE_ROLE_PREFIX) :]
    return None


def list_label(name: str, owner: str) -> str:
    """How the study list names a baseline companion."""
    return f"{name} (baseline of {owner}, not a search)"


def order_studies(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The dashboard's study list (in the order it reverses for "newest first") with each baseline companion
    just before its own study, so that the page shows it right after that study, and labelled as what it is.

    A companion whose study is not in the list stays where it was."""
    names = {s.get("study_name") for s in summaries}
    companions: dict[str, list[dict[str, Any]]] = {}
    rest: list[dict[str, Any]] = []
    for summary in summaries:
        owner = _companion_of(summary)
        if owner is not None and owner in names:
            companions.setdefault(owner, []).append({**summary, "study_name": list_label(summary["study_name"], owner)})
        else:
            rest.append(summary)
    out: list[dict[str, Any]] = []
    for summary in rest:
        out += companions.get(summary.get("study_name", ""), [])
        out.append(summary)
    return out


class ReviewApp:
    """optuna-dashboard's WSGI ``app`` serving ``storage``, with the study list and the importances changed (see
    the module's docstring)."""

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]], storage: Any) -> None:
        self.app = app
        self.storage = storage

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "GET":
            path = environ.get("PATH_INFO", "")
            if path == "/api/studies":
                return self._study_list(environ, start_response)
            match = _IMPORTANCE_PATH.fullmatch(path)
            if match:
                hidden = self._hidden_importances(int(match[1]))
                if hidden is not None:
                    return _json(start_response, hidden)
        return self.app(environ, start_response)

    def _hidden_importances(self, study_id: int) -> dict[str, Any] | None:
        """An empty answer for each objective while the study has too few complete trials, else None."""
        try:
            directions = self.storage.get_study_directions(study_id)
            complete = self.storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
        except KeyError:
            return None  # the dashboard answers 404 itself
        if len(complete) >= MIN_TRIALS_FOR_IMPORTANCE:
            return None
        return {"param_importances": [[] for _ in directions]}

    def _study_list(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], Any]:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        inner = {**environ, "HTTP_ACCEPT_ENCODING": "identity"}  # a body this wrapper can read
        body = b"".join(self.app(inner, capture))
        if not str(captured.get("status", "")).startswith("200"):
            start_response(captured["status"], captured["headers"])
            return [body]
        data = json.loads(body)
        data["study_summaries"] = order_studies(list(data.get("study_summaries", [])))
        return _json(start_response, data)


def _json(start_response: StartResponse, data: Any) -> list[bytes]:
    body = json.dumps(data).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def storage_for(storage: str | optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """One storage object for the dashboard and this wrapper."""
    return optuna.storages.get_storage(storage) if isinstance(storage, str) else storage
