"""Trials per hour on one GPU with K trials at a time: ``koopman-search launch --gpus 0 --trials-per-gpu K``.

    .venv/bin/python bench/bench_gpu_trials.py --trials-per-gpu 1,2,4,8     # run by bench/gpu.sh

For each K, a fresh SQLite study in a temporary folder: the WikiText-2 study file at the user's shapes, with
``--epochs`` epochs of ``--steps`` steps and ``--eval-batches`` validation batches, no shared warmup, the
prune rules off (limits 1e9, a fixed baseline curve: no baseline run), ``--trials-per-slot`` × K trials.
The wall time runs from the command's start to its end (worker start-up, CUDA initialisation and the
trials); trials per hour = complete trials ÷ that time. Each K's command gets ``--limit`` seconds at most.
Written for a CUDA machine and not yet run on one (BENCHMARKS.md); ``--cpu`` runs the same on CPU workers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import WIKITEXT2, study_file_dict  # noqa: E402

OFF_LIMIT = 1e9


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {v!r}")


def to_toml(d: dict[str, Any], prefix: str = "") -> str:
    """The few TOML forms a study file uses: tables, scalars, lists and inline tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", to_toml(v, f"{prefix}{k}.")]
    return "\n".join(lines)


def study_toml(args: argparse.Namespace, k: int, folder: Path) -> Path:
    d = copy.deepcopy(study_file_dict())
    d["study"].update(
        name=f"gpu-trials-k{k}",
        storage=f"sqlite:///{folder / 'study.db'}",
        artifacts=str(folder / "artifacts"),
        n_trials=args.trials_per_slot * k,
        shared_warmup=False,
    )
    d["trainer"]["data"]["source"] = f"files:{Path(args.data).resolve()}"
    d["trainer"]["train"].update(
        epochs=args.epochs,
        device="cpu" if args.cpu else "cuda",
        max_steps_per_epoch=args.steps,
        max_eval_batches=args.eval_batches,
    )
    d["search"]["koopman_start_epoch"] = {"type": "int", "low": 1, "high": max(1, args.epochs - 1)}
    d["enqueue"] = []
    d["rules"] = {"total_loss_max": OFF_LIMIT, "val_ppl_ratio_max": OFF_LIMIT}
    d["baseline"] = {"val_ppl": [1.0] * args.epochs}  # only the (off) ratio rule reads it
    path = folder / "study.toml"
    del d["enqueue"]  # an empty array of tables
    path.write_text(to_toml(d) + "\n")
    return path


def complete_trials(path: Path) -> tuple[int, int]:
    import optuna

    from koopman_search.search.studyfile.spec import load_spec

    spec = load_spec(path)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage_url)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return sum(s == optuna.trial.TrialState.COMPLETE for s in states), len(states)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials-per-gpu", default="1,2,4,8", help="values of K, comma-separated (default 1,2,4,8)")
    p.add_argument("--data", default=str(WIKITEXT2))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="training steps per epoch (default 100)")
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--trials-per-slot", type=int, default=2)
    p.add_argument("--limit", type=int, default=75, help="seconds at most per K (default 75)")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="K CPU workers instead of K slots on GPU 0: a dry run of this script on a machine without one",
    )
    args = p.parse_args(argv)
    ks = [int(v) for v in args.trials_per_gpu.split(",")]
    print(f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(
        f"One GPU, {args.epochs} epochs × {args.steps} steps + {args.eval_batches} validation batches per trial, "
        f"{args.trials_per_slot} trials per slot, at most {args.limit} s per K.\n"
    )
    print("| K (--trials-per-gpu) | trials complete / started | wall s | trials per hour | ratio to K=1 |")
    print("|---|---|---|---|---|")
    first: float | None = None
    for k in ks:
        with tempfile.TemporaryDirectory(prefix=f"gpu-trials-k{k}-") as tmp:
            path = study_toml(args, k, Path(tmp))
            cmd = [sys.executable, "-m", "koopman_search.search.cli", "launch", str(path)]
            cmd += ["--workers", str(k)] if args.cpu else ["--gpus", "0", "--trials-per-gpu", str(k)]
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL)
            try:
                proc.wait(timeout=args.limit)
            except subprocess.TimeoutExpired:
                # the supervisor's stop: every slot ends after its current epoch and hands its trial back
                print(f"K={k}: stopping after {args.limit} s", file=sys.stderr)
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            wall = time.perf_counter() - start
            done, started = complete_trials(path)
        rate = 3600 * done / wall
        first = rate if first is None else first
        print(
            f"| {k} | {done} / {started} | {wall:.0f} | {rate:.0f} | {rate / first:.2f} |"
            if first
            else f"| {k} | {done} / {started} | {wall:.0f} | {rate:.0f} | n/a |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
