"""``koopman-search create``: create a study and queue its trial budget, then exit (idempotent)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from koopman_search.search.cli._common import (
    add_budget_arg,
    add_redefine_arg,
    add_study_args,
    refuse_proxy,
    spec_with_overrides,
)
from koopman_search.search.studyfile.spec import load_spec
from koopman_search.search.studyfile.urls import redact_url

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

EXAMPLE = """examples:
  koopman-search create studies/wikitext2.toml
  OPTUNA_STORAGE=postgresql+psycopg://koopman:PASS@db:5432/koopman koopman-search create studies/wikitext2.toml

Then start workers on every machine: koopman-search worker studies/wikitext2.toml --gpus all
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "create",
        help="create a study and queue its trials (no training)",
        description="Create the study if it does not exist, store its definition, and queue the listed "
        "trials and the rest of the budget. Running it again changes nothing.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_args(p)
    add_budget_arg(p)
    add_redefine_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from koopman_search.search.engine.study import create_or_load_study, ensure_budget
    from koopman_search.search.storage.artifacts import check_artifacts
    from koopman_search.search.storage.database import open_storage

    spec = spec_with_overrides(load_spec(args.study), args)  # validated before any storage is touched
    refuse_proxy(spec.storage_url, "create")
    if args.n_trials is not None and args.n_trials < 1:
        from koopman_search.search.errors import SpecError

        raise SpecError(f"--n-trials must be >= 1, but got n_trials={args.n_trials}")
    check_artifacts(spec.artifacts_dir)  # before the database is written
    storage = open_storage(spec.storage_url, heartbeat=False)
    study, created = create_or_load_study(spec, storage, redefine=args.redefine)
    added = ensure_budget(study, spec, args.n_trials)
    print(
        f"study {spec.name} {'created' if created else 'exists'} in {redact_url(spec.storage_url)}; "
        f"{added} trial(s) queued"
    )
    return 0
