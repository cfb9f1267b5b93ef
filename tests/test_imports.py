"""What importing a package loads: the trainer never needs Optuna, and the study-file side stays light.

Each check runs in a fresh interpreter, so that what other tests imported does not count.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded(statement: str, modules: tuple[str, ...]) -> list[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


@pytest.mark.parametrize(
    "statement",
    ["import koopman_search.trainer", "import koopman_search.trainer.loop", "import koopman_search.trainer.checkpoint"],
)
def test_the_trainer_never_loads_optuna(statement: str) -> None:
    assert _loaded(statement, ("optuna", "sqlalchemy")) == []


def test_importing_search_loads_neither_torch_optuna_nor_sqlalchemy() -> None:
    assert _loaded("import koopman_search.search", ("torch", "optuna", "sqlalchemy")) == []


def test_the_trial_engine_does_not_load_the_review() -> None:
    loaded = _loaded(
        "import koopman_search.search.engine.runner, koopman_search.search.engine.baseline, "
        "koopman_search.search.engine.study, koopman_search.search.engine.job",
        ("koopman_search.search.review", "plotly"),
    )
    assert loaded == []


def test_writing_a_report_loads_no_torch() -> None:
    assert _loaded("import koopman_search.search.review.report, koopman_search.search.cli.report", ("torch",)) == []
