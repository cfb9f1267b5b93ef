"""The supervisor's restart policy (search/workers/restart.py), exit code by exit code."""

from __future__ import annotations

import signal

import pytest

from koopman_search.search.workers import MAX_RESTARTS, RestartDecision, decide_restart
from koopman_search.search.workers.events import EXIT_FATAL, EXIT_OUTAGE

KILLED = -int(signal.SIGKILL)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"exit_code": 0}, RestartDecision("done", "finished")),
        ({"exit_code": 0, "stop_requested": True}, RestartDecision("done", "stopped")),
        ({"exit_code": KILLED, "stop_requested": True}, RestartDecision("done", "stopped")),
        ({"exit_code": EXIT_FATAL}, RestartDecision("give up", "fatal")),
        ({"exit_code": EXIT_FATAL, "share_used": True}, RestartDecision("give up", "fatal")),
        ({"exit_code": 1, "share_used": True}, RestartDecision("done", "share used")),
        ({"exit_code": KILLED}, RestartDecision("restart", "crash", 1.0)),
        ({"exit_code": 1, "crashes": 3}, RestartDecision("restart", "crash", 8.0)),
        ({"exit_code": 1, "crashes": MAX_RESTARTS - 1}, RestartDecision("restart", "crash", 16.0)),
        ({"exit_code": 1, "crashes": MAX_RESTARTS}, RestartDecision("give up", "too many crashes")),
        ({"exit_code": EXIT_OUTAGE, "outages": 2}, RestartDecision("restart", "outage", 4.0)),
        ({"exit_code": EXIT_OUTAGE, "outages": 40, "crashes": 99}, RestartDecision("restart", "outage", 60.0)),
    ],
)
def test_each_exit_gets_its_decision(kwargs: dict[str, int | bool], expected: RestartDecision) -> None:
    assert decide_restart(**kwargs) == expected  # type: ignore[arg-type]
