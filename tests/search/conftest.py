"""Fixtures of the worker-process tests (tests/search/test_workers.py, test_faults.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.search.slow_model import STEP_SECONDS_ENV

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of worker processes (and of supervisors started in this process)."""
    monkeypatch.setenv("KOOPMAN_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # tests.search.slow_model, from any working directory
    monkeypatch.setenv(STEP_SECONDS_ENV, "0.05")
    return dict(os.environ)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Supervisors started by a test; any left running at the end are killed (their workers see their
    stdin close and stop by themselves)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
