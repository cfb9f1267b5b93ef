"""The synthetic study every review test looks at."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tests.search.review.synthetic import make_review_study


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'review-demo.db'}"


@pytest.fixture
def study(storage_url: str) -> optuna.Study:
    return make_review_study(storage_url)
