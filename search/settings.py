"""Settings read from the environment, each checked once, with one error shape.

    KOOPMAN_HEARTBEAT_INTERVAL   seconds between a running trial's heartbeats      integer >= 1, default 30
    KOOPMAN_OUTAGE_TIMEOUT       seconds a worker waits out a database outage      number >= 0, default 1800
    KOOPMAN_ENV_RETRY_MAX        attempts of a trial its environment may fail      integer >= 0, default 3

They are read and checked once, at a process's entry point, into one :class:`RuntimeSettings`: every command
(``koopman-search ...``) and every worker process reads them with :meth:`RuntimeSettings.from_environment`,
so a bad value stops it with one line and exit code 2 before it touches anything, and runs under them
(:func:`configured`). The code that needs one asks :func:`runtime` when it needs it. A library user who never
goes through an entry point gets them from the environment on first use, a bad value replaced by its default
with a warning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from koopman_search.trainer.errors import ConfigError

__all__ = [
    "ENV_SETTINGS",
    "EnvSetting",
    "RuntimeSettings",
    "check_environment",
    "configured",
    "env_setting",
    "runtime",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnvSetting:
    name: str
    integer: bool
    minimum: float
    default: float
    what: str

    def parse(self, raw: str) -> float:
        """The value of ``raw``; raises :class:`ConfigError` naming the variable and the value."""
        kind = "an integer" if self.integer else "a number"
        try:
            value = int(raw) if self.integer else float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= self.minimum):
            raise ConfigError(
                f"{self.name} must be {kind} >= {self.minimum:g} ({self.what}), but got {self.name}={raw!r}; "
                f"unset it for the default {self.default:g}"
            )
        return value


ENV_SETTINGS = {
    s.name: s
    for s in (
        EnvSetting("KOOPMAN_HEARTBEAT_INTERVAL", True, 1, 30, "seconds between a running trial's heartbeats"),
        EnvSetting("KOOPMAN_OUTAGE_TIMEOUT", False, 0, 1800, "seconds a worker waits out a database outage"),
        EnvSetting("KOOPMAN_ENV_RETRY_MAX", True, 0, 3, "attempts of a trial its environment may fail"),
    )
}


def env_setting(name: str) -> float:
    """The setting's value from the environment, or its default when unset or bad (a bad value is logged;
    commands refuse it earlier, in :func:`check_environment`)."""
    setting = ENV_SETTINGS[name]
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return setting.default
    try:
        return setting.parse(raw)
    except ConfigError as exc:
        logger.warning("%s; using the default", exc)
        return setting.default


def check_environment() -> None:
    """Raise :class:`ConfigError` for the first setting in the environment with a bad value."""
    RuntimeSettings.from_environment(strict=True)


@dataclass(frozen=True)
class RuntimeSettings:
    """The settings a process runs under (the KOOPMAN_* variables above)."""

    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats
    outage_timeout: float = 1800.0  # seconds a worker waits out a database outage
    env_retry_max: int = 3  # attempts of a trial its environment may fail

    @classmethod
    def from_environment(cls, strict: bool = True) -> RuntimeSettings:
        """Read from the environment. ``strict``: a bad value raises :class:`ConfigError`; else it is
        replaced by its default, with a warning."""
        values: list[float] = []
        for name, setting in ENV_SETTINGS.items():
            raw = os.environ.get(name)
            if raw is None or raw == "":
                values.append(setting.default)
            elif strict:
                values.append(setting.parse(raw))
            else:
                values.append(env_setting(name))
        heartbeat, outage, retries = values
        return cls(int(heartbeat), float(outage), int(retries))


_current: RuntimeSettings | None = None


def runtime() -> RuntimeSettings:
    """The settings this process runs under: its entry point's (:func:`configured`), else read from the
    environment once."""
    global _current
    if _current is None:
        _current = RuntimeSettings.from_environment(strict=False)
    return _current


@contextmanager
def configured(settings: RuntimeSettings) -> Iterator[RuntimeSettings]:
    """Run under ``settings`` inside the block (a command, a worker process); the ones before come back after."""
    global _current
    before, _current = _current, settings
    try:
        yield settings
    finally:
        _current = before


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOGGER = "koopman_search"  # the search's and the trainer's loggers are all under it


def configure_logging(level: int | str, optuna_level: int | None = None) -> None:
    """One line format on stderr for the search, the trainer and (with ``optuna_level``) Optuna's own lines;
    everything else at WARNING. The CLI and each worker process call this once at their start."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger(LOGGER).setLevel(level)
    if optuna_level is not None:
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        optuna.logging.set_verbosity(optuna_level)
