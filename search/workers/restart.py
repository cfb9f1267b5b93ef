"""The supervisor's restart policy, on plain values: what to do when a worker process exits.

    decide_restart(exit_code, stop_requested=False, share_used=False, crashes=0, outages=0)
    # RestartDecision(action="restart", delay=1.0, reason="crash")

A process that exits 0 is done; one stopped on request is done; EXIT_FATAL (an error a restart cannot fix)
is given up; one that ran its share of the trial cap is done; EXIT_OUTAGE (the database out of reach) is
started again after a doubling pause, for ever; any other exit is a crash, started again after a doubling
pause, and given up after :data:`MAX_RESTARTS` crashes in a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from koopman_search.search.workers.events import EXIT_FATAL, EXIT_OUTAGE

__all__ = ["MAX_RESTARTS", "RESTART_DELAY", "RESTART_DELAY_MAX", "RestartDecision", "decide_restart"]

MAX_RESTARTS = 5  # crashes in a row (no trial finished in between) before a slot is given up
RESTART_DELAY, RESTART_DELAY_MAX = 1.0, 60.0  # seconds before a crashed slot starts again; doubles per crash


@dataclass(frozen=True)
class RestartDecision:
    """``action``: "done" (the slot ends cleanly), "give up" (it ends as failed) or "restart" after
    ``delay`` seconds; ``reason``: "finished", "stopped", "fatal", "share used", "outage", "crash",
    "too many crashes"."""

    action: Literal["done", "give up", "restart"]
    reason: str
    delay: float = 0.0


def _backoff(count: int) -> float:
    return min(RESTART_DELAY * 2**count, RESTART_DELAY_MAX)


def decide_restart(
    exit_code: int, stop_requested: bool = False, share_used: bool = False, crashes: int = 0, outages: int = 0
) -> RestartDecision:
    """What to do with a slot whose process exited with ``exit_code`` (negative: killed by that signal), after
    ``crashes`` crashes and ``outages`` outage exits in a row."""
    if exit_code == 0:
        return RestartDecision("done", "stopped" if stop_requested else "finished")
    if stop_requested:
        return RestartDecision("done", "stopped")
    if exit_code == EXIT_FATAL:
        return RestartDecision("give up", "fatal")
    if share_used:
        return RestartDecision("done", "share used")
    if exit_code == EXIT_OUTAGE:  # the database is out of reach: wait for it, never give the slot up
        return RestartDecision("restart", "outage", _backoff(outages))
    if crashes >= MAX_RESTARTS:
        return RestartDecision("give up", "too many crashes")
    return RestartDecision("restart", "crash", _backoff(crashes))
