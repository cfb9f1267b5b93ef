"""A whole trial of studies/wikitext2.toml, reduced to a few steps per epoch: wall and CPU time, before and after.

    .venv/bin/python bench/bench_trial.py                              # this checkout's trainer, one run
    .venv/bin/python bench/bench_trial.py --before /tmp/before         # and another trainer, side by side

The trial is the study's first ``[[enqueue]]`` trial (hand-tuned 1: Koopman from epoch 4, dim 256) at the
study's shapes and its 10 epochs, trained from scratch (no shared warmup), with ``max_steps_per_epoch`` and
``max_eval_batches`` cut to ``--steps`` and ``--eval-batches`` so that it takes a minute or two on a CPU.
``--before DIR`` names a folder holding another version of the ``trainer`` package (for instance
``git archive <commit> trainer | tar -x -C DIR``): each run is its own process, the two alternate for
``--rounds`` rounds, and the table gives the median of the per-round ratios. One torch thread by default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2"  # bench/_common.py's


def _trainer_from(folder: Path) -> None:
    """Import ``koopman_search.trainer`` from ``folder`` (another checkout's trainer/) instead of this one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "koopman_search.trainer", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench_trial: no trainer package in {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["koopman_search.trainer"] = module
    spec.loader.exec_module(module)


def run_trial(args: argparse.Namespace) -> int:
    """This process: one trial, with ``trainer`` imported from ``args.trainer_from`` if given."""
    if args.trainer_from:
        _trainer_from(Path(args.trainer_from).resolve() / "trainer")
    import torch

    from koopman_search import trainer
    from koopman_search.search.studyfile.spec import load_spec
    from koopman_search.trainer.config import with_overrides
    from koopman_search.trainer.loop import HybridKoopmanTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(args.study)
    params = spec.enqueue[args.trial].params
    cfg = with_overrides(
        spec.trial_config(params),
        {
            "train.max_steps_per_epoch": args.steps,
            "train.max_eval_batches": args.eval_batches,
            "train.device": args.device,
            "data.source": args.data,
        },
        origin="bench_trial",
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer_ = HybridKoopmanTrainer(cfg)
    records = trainer_.fit()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(
        json.dumps(
            {
                "trainer": str(Path(trainer.__file__).parent),
                "wall_s": wall,
                "cpu_s": cpu,
                "epochs": len(records),
                "final_val_ppl": records[-1].val_ppl,
                "final_lm_loss": records[-1].lm_loss,
            }
        )
    )
    return 0


def _child(args: argparse.Namespace, trainer_from: str) -> dict[str, float]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--study",
        args.study,
        "--steps",
        str(args.steps),
        "--eval-batches",
        str(args.eval_batches),
        "--trial",
        str(args.trial),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--child",
    ]
    if trainer_from:
        cmd += ["--trainer-from", trainer_from]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ)).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    print(f"  {result}", file=sys.stderr, flush=True)
    return result


def compare(args: argparse.Namespace) -> int:
    versions = {"after (this checkout)": ""}
    if args.before:
        versions = {"before (" + args.before + ")": args.before, **versions}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
    for r in range(args.rounds):
        order = list(versions) if r % 2 == 0 else list(reversed(versions))
        for name in order:
            runs[name].append(_child(args, versions[name]))
    print(f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(
        f"Trial {args.trial} of {args.study}, {args.steps} steps and {args.eval_batches} validation batches per "
        f"epoch, {args.rounds} rounds (each version in its own process, alternating), load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
    )
    first = next(iter(versions))
    print("| trainer | epochs | median wall s | median CPU s | CPU ÷ first's (median, min–max) | final val_ppl |")
    print("|---|---|---|---|---|---|")
    for name, values in runs.items():
        ratios = [v["cpu_s"] / b["cpu_s"] for v, b in zip(values, runs[first], strict=True)]
        print(
            f"| {name} | {int(values[0]['epochs'])} | {statistics.median(v['wall_s'] for v in values):.1f} | "
            f"{statistics.median(v['cpu_s'] for v in values):.1f} | **{statistics.median(ratios):.3f}** "
            f"({min(ratios):.3f}–{max(ratios):.3f}) | {values[-1]['final_val_ppl']:.2f} |"
        )
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default=str(REPO / "studies" / "wikitext2.toml"))
    p.add_argument("--data", default=f"files:{WIKITEXT2}", help="the trainer's data source (default: %(default)s)")
    p.add_argument("--trial", type=int, default=0, help="which [[enqueue]] trial (default 0, the first)")
    p.add_argument("--steps", type=int, default=5, help="training steps per epoch (default 5)")
    p.add_argument("--eval-batches", type=int, default=5, help="validation batches per epoch (default 5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's choice)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each version (default 2)")
    p.add_argument("--before", default="", help="a folder with another version of the trainer package")
    p.add_argument("--trainer-from", default="", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_batches < 1 or args.rounds < 1:
        p.error(
            f"--steps, --eval-batches and --rounds must be >= 1, but got steps={args.steps}, "
            f"eval_batches={args.eval_batches}, rounds={args.rounds}"
        )
    if args.before and not (Path(args.before) / "trainer" / "__init__.py").is_file():
        p.error(f"--before must be a folder holding a trainer package, but got before={args.before!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_trial(args) if args.child else compare(args)


if __name__ == "__main__":
    sys.exit(main())
