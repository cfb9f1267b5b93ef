"""optuna-dashboard for koopman-search studies: notes and figures through the dashboard's own API, and
the server.

Who writes what:

- :func:`annotate_trial` is called by the worker loop (:func:`search.workers.run_worker`) once a trial has
  finished, been pruned or failed and its end is stored. It writes the trial's note. Only that trial's own
  worker writes it, so workers never race. It never raises: a review problem must not stop a worker.
- :func:`annotate_study` writes the study note, the trial-curve figures and the Pareto front, and fills in
  any missing trial note. It is run by one process at a time (``koopman-search dashboard`` before serving
  and every ``--refresh`` seconds), because optuna-dashboard stores a figure as several study attrs that
  two concurrent writers could interleave.

Both are idempotent: unchanged text is not rewritten, and a note someone edited in the dashboard is kept
(the digest of what was last written is stored beside it).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
import optuna_dashboard
from optuna.trial import FrozenTrial, TrialState

from koopman_search.search.review import figures
from koopman_search.search.review.dashboard_app import ReviewApp, storage_for
from koopman_search.search.review.notes import study_note, trial_note
from koopman_search.search.review.reach import findings
from koopman_search.search.review.stored import (
    StoredBaseline,
    StoredRules,
    TrialFacts,
    objective_directions,
    objective_names,
    read_baseline,
    read_rules,
    search_meta,
    trial_facts,
)
from koopman_search.search.review.summary import best_trials, summarize
from koopman_search.search.review.trial_image import trial_image_markdown
from koopman_search.search.storage.layout import (
    BASELINE_ROLE_PREFIX,
    ROLE_ATTR,
    SPEC_ATTR,
    baseline_key_seed,
    study_attrs,
)
from koopman_search.search.storage.optuna_private import storage_of, study_id_of
from koopman_search.search.studyfile.prune_settings import RuleSettings

__all__ = [
    "FIGURE_IDS",
    "AnnotationCounts",
    "DashboardServer",
    "Refresher",
    "annotate_storage",
    "annotate_study",
    "annotate_trial",
    "is_loopback",
    "make_server_for",
]

logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# optuna-dashboard graph-object ids of the study figures (stable, so a refresh overwrites them)
FIGURE_IDS = {
    "val_ppl": "koopman-val-ppl",
    "losses": "koopman-losses",
    "linearity": "koopman-linearity",
    "weight": "koopman-weight",
    "pareto": "koopman-pareto-front",
    "spectrum": "koopman-k-spectrum",
}
_DIGEST_PREFIX = "koopman_search:digest:"


@dataclass
class AnnotationCounts:
    notes_written: int = 0
    notes_unchanged: int = 0
    notes_kept: int = 0  # edited by someone in the dashboard, left alone
    figures_written: int = 0
    figures_unchanged: int = 0

    def __str__(self) -> str:
        return (
            f"{self.notes_written} notes written, {self.notes_unchanged} unchanged, "
            f"{self.notes_kept} kept as edited; {self.figures_written} figures written, "
            f"{self.figures_unchanged} unchanged"
        )


class _NoteTarget:
    """What optuna_dashboard's ``save_note``/``get_note`` read from a trial: its storage, study and id.

    A finished trial has no live ``optuna.Trial``, and building one would call the sampler's hooks."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.study = study
        self.storage = storage_of(study)
        self._trial_id = trial_id


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _system_attrs(study: optuna.Study) -> dict[str, Any]:
    return storage_of(study).get_study_system_attrs(study_id_of(study))


def _set_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    storage_of(study).set_study_system_attr(study_id_of(study), key, value)


def _write_note(study: optuna.Study, trial_id: int | None, body: str, counts: AnnotationCounts) -> None:
    """Write ``body`` unless it is already there or the current note was edited by someone else."""
    target: Any = study if trial_id is None else _NoteTarget(study, trial_id)
    key = _DIGEST_PREFIX + ("note" if trial_id is None else f"note:{trial_id}")
    current = optuna_dashboard.get_note(target)
    if current == body:
        counts.notes_unchanged += 1
        return
    if current and _system_attrs(study).get(key) != _digest(current):
        whose = "the study" if trial_id is None else f"trial id {trial_id}"
        logger.debug("keeping the edited note of %s: it was edited in the dashboard", whose)
        counts.notes_kept += 1
        return
    optuna_dashboard.save_note(cast("optuna.Trial", target), body)
    _set_system_attr(study, key, _digest(body))
    counts.notes_written += 1


def _write_figure(study: optuna.Study, figure_id: str, figure: Any, counts: AnnotationCounts) -> None:
    text = figure.to_json()
    key = _DIGEST_PREFIX + f"figure:{figure_id}"
    if _system_attrs(study).get(key) == _digest(text):
        counts.figures_unchanged += 1
        return
    optuna_dashboard.save_plotly_graph_object(study, figure, graph_object_id=figure_id)
    _set_system_attr(study, key, _digest(text))
    counts.figures_written += 1


def _rules_from(rules: StoredRules | RuleSettings | Mapping[str, Any] | None, study: optuna.Study) -> StoredRules:
    if isinstance(rules, StoredRules):
        return rules
    if rules is None:
        return read_rules(study_attrs(study))
    limits = rules.to_dict() if isinstance(rules, RuleSettings) else dict(rules)
    return read_rules({SPEC_ATTR: {"rules": limits}})


def _baseline_from(curve: Sequence[float | None] | None, study: optuna.Study) -> StoredBaseline | None:
    stored = read_baseline(study_attrs(study))
    if curve is None:
        return stored
    return StoredBaseline(
        seed=stored.seed if stored is not None else 0,
        state=stored.state if stored is not None else "given",
        val_ppl=tuple(None if v is None else float(v) for v in curve),
        columns=stored.columns if stored is not None else None,
    )


def annotate_trial(
    study: optuna.Study,
    trial: optuna.Trial | FrozenTrial,
    *,
    values: Sequence[float] | None = None,
    baseline_curve: Sequence[float | None] | None = None,
    rules: StoredRules | RuleSettings | Mapping[str, Any] | None = None,
    artifact_store: Any | None = None,
) -> bool:
    """Write the dashboard note of one finished trial. Returns whether the note is in place.

    Call it once the trial's user attrs (``records``, ``prune_reason``, ``epochs_run``, ...) are stored:
    with the finished ``FrozenTrial`` after ``study.tell``, as the worker loop does, or with a still-running
    ``optuna.Trial`` (it then counts as pruned when it has a ``prune_reason`` attr, failed with a
    ``fail_reason``, else complete with ``values``). ``baseline_curve`` (val perplexity per epoch) and
    ``rules`` (``total_loss_max``, ``val_ppl_ratio_max``; a ``RuleSettings`` will do) default to what the
    study stores. With ``artifact_store``, the note opens with the trial's curves as an image stored there
    (:mod:`search.review.trial_image`). Never raises: problems are logged.
    """
    try:
        facts = trial_facts(trial, values)
        baseline, stored_rules = _baseline_from(baseline_curve, study), _rules_from(rules, study)
        image = None
        if artifact_store is not None:
            image = trial_image_markdown(study, facts, baseline, stored_rules, artifact_store)
        note = trial_note(facts, objective_names(study), baseline, stored_rules, image)
        _write_note(study, facts.trial_id, note, AnnotationCounts())
    except Exception:  # the review is a side product: a failure here must never fail the trial
        logger.warning("could not write the dashboard note of trial %d", trial.number, exc_info=True)
        return False
    return True


def annotate_study(study: optuna.Study, artifact_store: Any | None = None) -> AnnotationCounts:
    """Write the study note and figures, and every missing or stale trial note; idempotent. With
    ``artifact_store``, each trial note opens with the trial's curves image (made once, stored there).

    Run by one process at a time (see the module docstring). Raises what the storage raises."""
    counts = AnnotationCounts()
    meta = search_meta(study.user_attrs)
    names = objective_names(study)
    if study.metric_names is None and meta.get("objectives"):
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and what the dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    attrs = study_attrs(study)
    rules = read_rules(attrs)
    baseline = read_baseline(attrs)
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    facts = [trial_facts(t) for t in finished]
    for fact in facts:
        image = trial_image_markdown(study, fact, baseline, rules, artifact_store) if artifact_store else None
        _write_note(study, fact.trial_id, trial_note(fact, names, baseline, rules, image), counts)
    all_facts = [trial_facts(t) for t in study.get_trials(deepcopy=False)]
    best = best_trials(study)
    summary = summarize(all_facts, baseline)
    said = findings(all_facts, rules, baseline, best, names)
    note = study_note(study.study_name, names, objective_directions(study), summary, baseline, rules, best, said)
    _write_note(study, None, note, counts)
    for figure_id, figure in study_figures(study, facts, baseline, rules, best).items():
        _write_figure(study, figure_id, figure, counts)
    _mark_baseline_companions(study, counts)
    logger.info("annotated study %s: %s", study.study_name, counts)
    return counts


def _mark_baseline_companions(study: optuna.Study, counts: AnnotationCounts) -> None:
    """A note on each baseline companion study (``<study>.baseline-seed<N>``, docs/design.md "Baseline"),
    which optuna-dashboard lists beside the real one: what it is, and which study to look at instead."""
    for key in study_attrs(study):
        seed = baseline_key_seed(key)
        if seed is None:
            continue
        name = f"{study.study_name}.baseline-seed{seed}"
        try:
            companion = optuna.load_study(study_name=name, storage=storage_of(study))
        except KeyError:  # a fixed curve, or a companion not created yet
            continue
        if not str(companion.user_attrs.get(ROLE_ATTR, "")).startswith(BASELINE_ROLE_PREFIX):
            continue  # not one the search made
        body = (
            f"## Baseline companion of study {study.study_name}\n\n"
            f"Not a search: its one trial is the Koopman-off baseline run of study **{study.study_name}** "
            f"(trainer seed {seed}), kept in a study of its own so that it runs once however many workers "
            f"start. Its curve is stored with study {study.study_name} (user attr `{key}`); review that study.\n"
        )
        _write_note(companion, None, body, counts)


def study_figures(
    study: optuna.Study,
    facts: Sequence[TrialFacts],
    baseline: StoredBaseline | None,
    rules: StoredRules,
    best: Sequence[TrialFacts],
) -> dict[str, Any]:
    """The dashboard's study figures by graph-object id: the four trial-curve views (best trial first
    selected) and, for two or more objectives, the Pareto front."""
    selected = best[0].number if best else None
    names = objective_names(study)
    out: dict[str, Any] = {}
    for kind in figures.KINDS:
        out[FIGURE_IDS[kind]] = figures.trial_curves_figure(
            kind, facts, baseline, rules, selected=selected, names=names
        )
    if len(study.directions) >= 2 and any(f.values is not None for f in facts):
        out[FIGURE_IDS["pareto"]] = figures.pareto_front_figure(study, names, facts, baseline)
    out[FIGURE_IDS["spectrum"]] = figures.spectrum_figure(facts, selected=selected, names=names)
    return out


def annotate_storage(
    storage: str | optuna.storages.BaseStorage,
    study_names: Sequence[str] | None = None,
    artifact_store: Any | None = None,
) -> dict[str, AnnotationCounts]:
    """:func:`annotate_study` for the named studies, or for every koopman-search study in the storage.

    Studies that fail are logged and skipped, so one broken study does not keep the others unannotated."""
    if study_names is None:
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
        study_names = [s.study_name for s in summaries if SPEC_ATTR in s.user_attrs]
    done: dict[str, AnnotationCounts] = {}
    for name in study_names:
        study = optuna.load_study(study_name=name, storage=storage)
        try:
            done[name] = annotate_study(study, artifact_store)
        except (optuna.exceptions.OptunaError, ValueError, TypeError, KeyError) as exc:
            debug = logger.isEnabledFor(logging.DEBUG)
            logger.warning("could not annotate study %s: %s", name, exc, exc_info=debug)
    return done


# ---- serving ---------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, 127.x, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _QuietHandler(WSGIRequestHandler):
    """Requests go to the debug log, not to stderr: the dashboard polls every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class DashboardServer(ThreadingMixIn, WSGIServer):
    """optuna-dashboard's WSGI app on a threading ``wsgiref`` server (one request does not block others)."""

    daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}/dashboard"


def make_server_for(
    storage: str | optuna.storages.BaseStorage,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifact_store: Any | None = None,
) -> DashboardServer:
    """An optuna-dashboard server bound to ``host:port`` (port 0: a free one); call ``serve_forever()``.

    With ``artifact_store`` (e.g. :func:`search.storage.artifacts.open_artifact_store`) the study's checkpoints
    and uploaded files are listed and downloadable in the dashboard. The study list and the importances are
    koopman-search's (:class:`search.review.dashboard_app.ReviewApp`)."""
    storage = storage_for(storage)
    app = ReviewApp(optuna_dashboard.wsgi(storage, artifact_store=artifact_store), storage)
    server = make_server(host, port, app, server_class=DashboardServer, handler_class=_QuietHandler)
    return cast("DashboardServer", server)


class Refresher(threading.Thread):
    """Re-annotates studies every ``interval_s`` seconds while the dashboard serves them."""

    def __init__(
        self,
        storage: str | optuna.storages.BaseStorage,
        study_names: Sequence[str] | None,
        interval_s: float,
        artifact_store: Any | None = None,
    ) -> None:
        super().__init__(name="koopman-search-annotate", daemon=True)
        self._storage = storage
        self._artifact_store = artifact_store
        self._study_names = study_names
        self._interval_s = interval_s
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                annotate_storage(self._storage, self._study_names, self._artifact_store)
            except optuna.exceptions.OptunaError as exc:  # e.g. a storage blip: try again next round
                logger.warning("could not refresh the dashboard annotations: %s", exc)

    def stop(self) -> None:
        self._stopping.set()
