"""What the Koopman term does: each objective and fit of K, on a frozen backbone and on the user's setup.

    .venv/bin/python bench/bench_koopman_objective.py --probe      # frozen-backbone collapse test (minutes)
    .venv/bin/python bench/bench_koopman_objective.py --live       # the user's setup, reduced steps (long)

``--probe`` trains the heads alone on a frozen, freshly initialised backbone (the builtin corpus, d_model 32,
2 blocks, k 32, every token of 8 × 32 per batch; the setting of tests/trainer/test_probe.py) and prints, every
100 steps, the objective, the same objective with K = I, φ's participation ratio and centred scale, and K's gain
over the identity.

``--live`` runs the user's setup on WikiText-2 (vocabulary 30000, sequence 128, batch 32, d_model 64, 4 blocks,
k 256, weight max 0.5 linear from start epoch 3, 10 epochs) reduced to ``--steps`` training steps per epoch and
``--eval-batches`` validation batches. The Koopman-off baseline runs once; every variant warm-starts from its
checkpoint after the start epoch (shared warmup, docs/design.md), so epochs 1..3 are the baseline's. One table
per variant, epoch by epoch, and an overhead line: Koopman epochs' training tokens/s against the baseline's same
epochs (wall clock, sequential runs on a shared machine: indicative, not a side-by-side ratio).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from bench._common import WIKITEXT2  # noqa: E402
from koopman_search.trainer.config import TrainerConfig, with_overrides  # noqa: E402
from koopman_search.trainer.loop import HybridKoopmanTrainer  # noqa: E402
from koopman_search.trainer.probe import PROBE, frozen_backbone_probe  # noqa: E402
from koopman_search.trainer.records import EpochRecord  # noqa: E402

DEFAULT_DATA = "files:" + os.path.relpath(WIKITEXT2)
PROBE_LOSSES = ("smooth_l1", "mse", "normalized", "vicreg", "decoder")
LIVE_VARIANTS = ("decoder/gradient", "decoder/lstsq", "smooth_l1/gradient", "smooth_l1/lstsq", "smooth_l1/dmd")


def fmt(v: float, spec: str = ".4g") -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def probe(steps: int, every: int) -> None:
    print(f"### Frozen backbone: the heads alone, {steps} steps (builtin corpus, d 32, 2 blocks, k 32)\n")
    print("| objective | step | loss | loss with K = I | φ participation ratio | φ centred RMS | gain over I |")
    print("|---|---|---|---|---|---|---|")
    for loss in PROBE_LOSSES:
        trainer = HybridKoopmanTrainer(with_overrides(TrainerConfig(), {**PROBE, "koopman.loss": loss}))
        t0 = time.perf_counter()
        for p in frozen_backbone_probe(trainer, steps, every):
            print(
                f"| {loss} | {p.step} | {fmt(p.loss, '.3g')} | {fmt(p.identity_loss, '.3g')} | "
                f"{p.phi_effective_rank:.2f} | {p.phi_scale:.3g} | {p.gain:.2f} |",
                flush=True,
            )
        print(f"probe {loss}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print()


def live_config(args: argparse.Namespace, **koopman: Any) -> TrainerConfig:
    return with_overrides(
        TrainerConfig(),
        {
            "data.source": args.data,
            "train.epochs": args.epochs,
            "train.max_steps_per_epoch": args.steps,
            "train.max_eval_batches": args.eval_batches,
            "train.device": "cpu",
            "koopman.start_epoch": args.start,
            "koopman.weight_max": args.weight,
            **{f"koopman.{k}": v for k, v in koopman.items()},
        },
        origin="bench",
    )


def live(args: argparse.Namespace) -> None:
    print(
        f"### The user's setup, {args.steps} steps per epoch, {args.eval_batches} validation batches "
        f"(weight max {args.weight}, start epoch {args.start}, {args.epochs} epochs)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = HybridKoopmanTrainer(live_config(args).without_koopman())
        base.fit(checkpoint_dir=tmp)
        print(f"baseline: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        baseline = {r.epoch: r for r in base.records}
        print("baseline val PPL by epoch: " + ", ".join(f"{e}: {r.val_ppl:.2f}" for e, r in baseline.items()) + "\n")
        overhead: list[str] = []
        for variant in args.variants.split(","):
            loss, _, fit = variant.partition("/")
            t0 = time.perf_counter()
            trainer = HybridKoopmanTrainer(live_config(args, loss=loss, fit=fit))
            trainer.warm_start_from(Path(tmp) / f"epoch_{args.start}.pt")
            records = trainer.fit()
            print(f"{loss}/{fit}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            table(loss, fit, records[args.start :], baseline)
            ks = [r for r in records[args.start :]]
            ratio = sum(baseline[r.epoch].tokens_per_s for r in ks) / sum(r.tokens_per_s for r in ks)
            overhead.append(f"| {loss} | {fit} | {ratio:.3f} |")
        print("#### Koopman epochs' training time against the baseline's same epochs (tokens/s ratio, wall)\n")
        print("| objective | fit | time ratio |\n|---|---|---|")
        print("\n".join(overhead) + "\n")


def table(loss: str, fit: str, records: list[EpochRecord], baseline: dict[int, EpochRecord]) -> None:
    print(f"#### {loss}, fit {fit}\n")
    print(
        "| epoch | weight | Koopman loss | total loss | fallback | val PPL | baseline PPL | NRE | gain over I | "
        "φ PR (h PR) | Koopman-forward PPL | ‖K‖₂ |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r.epoch} | {r.koopman_weight:.4f} | {r.koopman_loss:.4g} | {r.total_loss:.4f} | "
            f"{r.fallback_batches} | {r.val_ppl:.2f} | {baseline[r.epoch].val_ppl:.2f} | "
            f"{fmt(r.val_koopman_nre)} | {fmt(r.val_koopman_gain, '.3g')} | "
            f"{fmt(r.phi_effective_rank, '.2f')} ({fmt(r.state_effective_rank, '.2f')}) | "
            f"{fmt(r.val_koopman_forward_ppl, '.1f')} | {fmt(r.koopman_k_norm, '.3g')} |"
        )
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", action="store_true", help="the frozen-backbone collapse test")
    p.add_argument("--live", action="store_true", help="the user's setup, reduced")
    p.add_argument("--probe-steps", type=int, default=400)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=20, help="training steps per epoch (live)")
    p.add_argument("--eval-batches", type=int, default=10, help="validation batches per epoch (live)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--start", type=int, default=3)
    p.add_argument("--weight", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    p.add_argument("--variants", default=",".join(LIVE_VARIANTS), help="objective/fit pairs, comma-separated")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.probe or args.live):
        p.error("choose --probe, --live or both")
    print(
        f"`{' '.join(['bench/bench_koopman_objective.py', *sys.argv[1:]])}`, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)\n"
    )
    if args.probe:
        probe(args.probe_steps, 100)
    if args.live:
        live(args)


if __name__ == "__main__":
    main()
