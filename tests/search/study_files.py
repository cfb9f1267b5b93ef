"""Tiny study files and command-line helpers shared by the service tests.

A tiny study (builtin corpus, vocabulary 2000, d_model 16, one block, 5 steps of 8 × 16 tokens per epoch,
2 validation batches, 3 epochs) trains an epoch in a fraction of a second on CPU, so a launch of a few
trials costs seconds; most of its time is opening the storage and loading the corpus cache.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest

from koopman_search.search.cli import main

BIN = Path(sys.executable).parent
KOOPMAN_SEARCH = str(BIN / "koopman-search")
OPTUNA = str(BIN / "optuna")

PARAMS = ("koopman_weight_max", "koopman_start_epoch", "fallback_threshold", "schedule", "koopman_dim")

TWO_OBJECTIVES = (
    '[{ metric = "val_ppl", direction = "minimize" }, { metric = "val_koopman_nre", direction = "minimize" }]'
)
ONE_OBJECTIVE = '[{ metric = "val_ppl", direction = "minimize" }]'

# Generous limits: the tiny model's loss stays near ln(2000) ≈ 7.6 for its few steps, above the user's 7.0,
# so tests that are not about pruning lift the limits out of the way.
NO_LIMIT_LOSS = 1000.0
NO_LIMIT_RATIO = 10.0

TEMPLATE = """\
[study]
name = "{name}"
storage = "{storage}"
n_trials = {n_trials}
sampler = "random"
seed = 0
objectives = {objectives}

[trainer.data]
source = "builtin"
vocab_size = 2000
seq_len = 16
batch_size = 8

[trainer.model]
d_model = 16
n_layers = 1
n_heads = 2

[trainer.koopman]
tokens_per_batch = 0

[trainer.train]
epochs = {epochs}
seed = 0
lr = 3e-3
device = "cpu"
max_steps_per_epoch = {steps}
max_eval_batches = 2

[search.koopman_weight_max]
type = "float"
low = 0.01
high = 0.5
log = true

[search.koopman_start_epoch]
type = "int"
low = 1
high = {last_start}

[search.fallback_threshold]
type = "float"
low = 4.0
high = 12.0

[search.schedule]
type = "categorical"
choices = ["linear", "exponential"]

[search.koopman_dim]
type = "categorical"
choices = [8, 16]

[rules]
total_loss_max = {total_loss_max!r}
val_ppl_ratio_max = {val_ppl_ratio_max!r}

[baseline]
val_ppl = {baseline}
"""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def write_study(
    directory: Path,
    *,
    name: str = "tiny",
    n_trials: int = 4,
    epochs: int = 3,
    steps: int = 5,
    objectives: int = 2,
    total_loss_max: float = NO_LIMIT_LOSS,
    val_ppl_ratio_max: float = NO_LIMIT_RATIO,
    baseline: str | Sequence[float] = "auto",
    enqueue: Sequence[Mapping[str, Any]] = (),
    storage: str = "",
    file_name: str = "study.toml",
) -> Path:
    """Write a tiny study file into ``directory`` and return its path. ``baseline`` is "auto" or a
    per-epoch list; each ``enqueue`` mapping becomes one ``[[enqueue]]`` table."""
    text = TEMPLATE.format(
        name=name,
        storage=storage,
        n_trials=n_trials,
        objectives=TWO_OBJECTIVES if objectives == 2 else ONE_OBJECTIVE,
        epochs=epochs,
        steps=steps,
        last_start=epochs - 1,
        total_loss_max=float(total_loss_max),
        val_ppl_ratio_max=float(val_ppl_ratio_max),
        baseline=_toml(baseline),
    )
    for item in enqueue:
        text += "\n[[enqueue]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in item.items())
    path = directory / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def interruptible() -> None:
    """``preexec_fn`` for a command a test stops with SIGINT, as a terminal's Ctrl-C does: a shell that runs
    the tests in the background (``nohup ... &``) leaves SIGINT ignored, its children inherit that, and
    Python then raises no KeyboardInterrupt at all. The child starts with SIGINT at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``koopman-search ARGV`` in process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what earlier steps printed
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str, command: str) -> list[str]:
    """The lines of ``err`` that are the command's error message (``koopman-search CMD: error: ...``)."""
    return [line for line in err.splitlines() if line.startswith(f"koopman-search {command}: error:")]


def progress_lines(out: str) -> list[str]:
    """Launch's one line per finished trial."""
    return [line for line in out.splitlines() if line.startswith("trial ")]


def status_json(capsys: pytest.CaptureFixture[str], name: str, url: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "status", "--study-name", name, "--storage", url, "--format", "json")
    assert code == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def study_names(url: str) -> list[str]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
    finally:
        storage.engine.dispose()


@contextmanager
def logging_restored() -> Iterator[None]:
    """``main`` configures logging for a command-line process; put the test process's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("koopman_search",)}
    optuna_logger = logging.getLogger("optuna")
    optuna_state = (optuna_logger.handlers[:], optuna_logger.propagate, optuna_logger.level)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)
        optuna_logger.handlers[:], optuna_logger.propagate, _ = optuna_state
        optuna_logger.setLevel(optuna_state[2])


def write_worker_study(
    directory: Path,
    storage: str,
    *,
    name: str = "w",
    n_trials: int = 4,
    epochs: int = 3,
    start_epoch: int | None = None,  # None: searched over 1..2
    dims: Sequence[int] = (8, 16),
    shared_warmup: bool = True,
    slow: bool = False,
    enqueue: Sequence[dict[str, Any]] = (),
) -> Path:
    """A tiny study for the worker tests (8 steps an epoch, its own artifact folder, searched start epoch 1..2
    unless ``start_epoch`` is given, the slow model with ``slow``), written to ``<directory>/<name>.toml``.
    The rules are loose, so only a NaN prunes."""
    start = (
        ('type = "fixed"\nvalue = ' + str(start_epoch))
        if start_epoch is not None
        else 'type = "int"\nlow = 1\nhigh = 2'
    )
    factory = 'factory = "tests.search.slow_model:build"' if slow else ""
    text = f"""
        [study]
        name = "{name}"
        storage = {_toml(storage)}
        artifacts = {_toml(str(directory / "artifacts"))}
        n_trials = {n_trials}
        sampler = "random"
        seed = 0
        shared_warmup = {_toml(shared_warmup)}

        [trainer.data]
        source = "builtin"
        vocab_size = 2000
        seq_len = 16
        batch_size = 8

        [trainer.model]
        d_model = 16
        n_layers = 1
        n_heads = 2
        {factory}

        [trainer.koopman]
        tokens_per_batch = 0

        [trainer.train]
        epochs = {epochs}
        seed = 0
        lr = 3e-3
        device = "cpu"
        max_steps_per_epoch = 8
        max_eval_batches = 2

        [search.koopman_weight_max]
        type = "float"
        low = 0.01
        high = 0.3
        log = true

        [search.koopman_start_epoch]
        {start}

        [search.fallback_threshold]
        type = "float"
        low = 4.0
        high = 12.0

        [search.schedule]
        type = "categorical"
        choices = ["linear", "exponential"]

        [search.koopman_dim]
        type = "categorical"
        choices = {list(dims)}

        [rules]
        total_loss_max = 100.0
        val_ppl_ratio_max = 100.0
    """
    text = textwrap.dedent(text)
    for item in enqueue:
        text += "\n[[enqueue]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in item.items())
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path
