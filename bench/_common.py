"""Helpers shared by the benchmark scripts: the machine line, markdown tables, the Pareto front and its
hypervolume, the WikiText-2 study file as a mapping, and scratch PostgreSQL databases.

The scripts are entry points: they configure logging (progress on stderr) and print their tables on stdout.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import secrets
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_POSTGRES",
    "REPO",
    "STUDY_FILE",
    "WIKITEXT2",
    "doc_parser",
    "hypervolume_2d",
    "machine_line",
    "markdown_table",
    "pareto_front",
    "postgres_scratch_db",
    "reduced_user_setup",
    "setup_logging",
    "study_file_dict",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
STUDY_FILE = REPO / "studies" / "wikitext2.toml"
WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2"  # the corpus beside the checkout (never committed)
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A script's argument parser from its docstring: the first paragraph as the description, the rest (the
    method) as the epilog of ``--help``, laid out as written."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def setup_logging(verbose: bool = False) -> None:
    """Progress of the benchmark on stderr; the product's own logs at WARNING unless ``verbose``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("bench").setLevel(logging.INFO)
    logging.getLogger("__main__").setLevel(logging.INFO)
    for name in ("trainer", "search"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the search opts into Optuna's heartbeat and artifact features on purpose; their notices are noise here
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def machine_line() -> str:
    """Cores, GPU, library versions, load and date: what a reader needs to weigh the numbers."""
    import optuna
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        load = "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        load = "load average n/a"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {gpu}, "
        f"torch {torch.__version__}, optuna {optuna.__version__}, "
        f"Python {platform.python_version()}, {load}, {now}"
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with 4 significant digits, None/NaN as ``-``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated points of ``points`` (both coordinates minimised), sorted by the first."""
    finite = sorted({p for p in points if all(math.isfinite(v) for v in p)})
    front: list[tuple[float, float]] = []
    best_y = math.inf
    for x, y in finite:
        if y < best_y:
            front.append((x, y))
            best_y = y
    return front


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The area dominated by ``points`` and bounded by ``reference`` (both coordinates minimised).

    Points not strictly better than the reference in both coordinates add nothing."""
    rx, ry = reference
    inside = [(x, y) for x, y in pareto_front(points) if x < rx and y < ry]
    area, previous_y = 0.0, ry
    for x, y in inside:  # x ascending, y descending along the front
        area += (rx - x) * (previous_y - y)
        previous_y = y
    return area


def reduced_user_setup(
    data: str, seq_len: int, batch_size: int, epochs: int, start_epoch: int, steps: int
) -> dict[str, Any]:
    """Trainer overrides for the user's setup (vocabulary 30000, d_model 64, 4 blocks, 4 heads, k 256) on the
    CPU, reduced to ``steps`` training steps of ``batch_size`` × ``seq_len`` tokens per epoch."""
    return {
        "data.source": data,
        "data.vocab_size": 30000,
        "data.seq_len": seq_len,
        "data.batch_size": batch_size,
        "model.d_model": 64,
        "model.n_layers": 4,
        "model.n_heads": 4,
        "koopman.dim": 256,
        "koopman.start_epoch": start_epoch,
        "train.epochs": epochs,
        "train.device": "cpu",
        "train.max_steps_per_epoch": steps,
    }


def study_file_dict(path: Path = STUDY_FILE) -> dict[str, Any]:
    """The study file as a plain mapping, to edit and pass to ``search.studyfile.spec.spec_from_dict``."""
    with path.open("rb") as fh:
        return tomllib.load(fh)


@contextmanager
def postgres_scratch_db(server_url: str, prefix: str) -> Iterator[str]:
    """A fresh database on the server of ``server_url`` for one run, dropped afterwards.

    Yields the SQLAlchemy URL of the scratch database."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"{prefix}_{int(time.time())}_{secrets.token_hex(3)}"
    conninfo: dict[str, Any] = {
        "host": url.host or "127.0.0.1",
        "port": url.port or 5432,
        "user": url.username or "postgres",
        "dbname": url.database or "postgres",
    }
    if url.password:
        conninfo["password"] = url.password
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    logger.info("scratch database %s created", name)
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        logger.info("scratch database %s dropped", name)
