"""What a study costs: the same study run four ways, side by side, in one run.

    .venv/bin/python bench/bench_search_cost.py                  # the default run (see --help for sizes)
    .venv/bin/python bench/bench_search_cost.py --trials 6 --epochs 4 --steps 10   # a quick look

The study is studies/wikitext2.toml (its search space, sampler, objectives and rules 7.0 / 1.3) on WikiText-2,
shrunk so that four studies fit in minutes on a CPU: fewer epochs, a capped number of steps per epoch and
of validation batches, and a smaller vocabulary and window (flags below). Each variant gets its own SQLite
study in a temporary directory and runs through the real search code path (create_or_load_study,
ensure_budget, run_worker) with the same sampler seed and the same trial budget, in its own process with
one torch thread; by default the four run at the same time, so that they share the machine's load alike
(CPU seconds per variant are the steady measure of cost on a shared machine; wall seconds are reported too):

  plain    every trial from scratch, no pruning: shared_warmup = false, rule limits 1e9 (the rules cannot
           be switched off in a study file, and 1e9 is never reached), and a fixed baseline curve, so no
           baseline run is spent (plain Optuna has none)
  rules    the prune rules (total_loss_max 7.0, val_ppl_ratio_max 1.3 against the auto baseline)
  warmup   shared warmup (trials start from the baseline's checkpoint at their start epoch), limits 1e9
  both     shared warmup and the prune rules (the study file's own setting)

Epochs trained count the trials' own epochs plus the baseline's. The result is the hypervolume of the
Pareto front of (val_ppl, val_koopman_nre), both minimised, against one reference point for all variants:
(1.3 x the baseline's final val_ppl, NRE 1.0), i.e. the region the user's criteria accept; and the best
val_ppl of a complete trial. The non-finite rule (a NaN metric prunes) stays on in every variant.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import multiprocessing as mp
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import REPO, hypervolume_2d, machine_line, markdown_table, pareto_front, setup_logging, study_file_dict

logger = logging.getLogger("bench.search_cost")

VARIANTS = ("plain", "rules", "warmup", "both")
OFF_LIMIT = 1e9  # a rule limit no run reaches: the rule is off
GOAL_SHARE = 0.40  # the goal: both together spend <= 40% of the plain epochs
REF_RATIO = 1.3  # the hypervolume's reference val_ppl: the user's limit, 1.3 x baseline (whatever --rules says)


@dataclass
class VariantResult:
    name: str
    wall_s: float
    cpu_s: float
    trial_epochs: int
    baseline_epochs: int
    warmup_epochs: int
    states: dict[str, int]
    params: dict[int, dict[str, Any]]
    values: dict[int, tuple[float, float]]  # COMPLETE trials only
    baseline_final_ppl: float | None
    points: list[tuple[float, float]] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return self.trial_epochs + self.baseline_epochs

    @property
    def best_ppl(self) -> float:
        return min((v[0] for v in self.values.values()), default=math.nan)


def build_spec(args: argparse.Namespace, variant: str, tmp: Path) -> Any:
    """The study file with this benchmark's sizes and the variant's switches, validated by the product."""
    from search.spec import spec_from_dict

    rules_on = variant in ("rules", "both")
    warmup_on = variant in ("warmup", "both")
    d = copy.deepcopy(study_file_dict())
    name = f"cost-{variant}"
    d["study"].update(
        name=name,
        storage=f"sqlite:///{tmp / name}.db",
        artifacts=str(tmp / f"{name}-artifacts"),
        n_trials=args.trials,
        seed=args.seed,
        shared_warmup=warmup_on,
    )
    d["trainer"]["data"].update(
        source=f"files:{Path(args.data).resolve()}",
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    d["trainer"]["model"].update(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads)
    d["trainer"]["train"].update(
        epochs=args.epochs, device="cpu", lr=args.lr, max_steps_per_epoch=args.steps, max_eval_batches=args.eval_batches
    )
    d["search"]["koopman_start_epoch"] = {"type": "int", "low": args.start_low, "high": args.start_high}
    # the file's hand-tuned trials start at epoch 4-5 of 10; here every trial comes from the sampler
    d["enqueue"] = []
    if rules_on:
        d["rules"] = {"total_loss_max": args.rules[0], "val_ppl_ratio_max": args.rules[1]}
    else:
        d["rules"] = {"total_loss_max": OFF_LIMIT, "val_ppl_ratio_max": OFF_LIMIT}
    if not rules_on and not warmup_on:
        d["baseline"] = {"val_ppl": [1.0] * args.epochs}  # only the (off) ratio rule reads it
    return spec_from_dict(d, origin=f"bench {name}", base_dir=REPO / "studies")


def run_variant(args: argparse.Namespace, variant: str, tmp: Path) -> VariantResult:
    import torch
    from optuna.trial import TrialState

    from search import layout
    from search.runner import format_outcome
    from search.storage import open_storage
    from search.study import create_or_load_study, ensure_budget
    from search.workers import run_worker

    torch.set_num_threads(args.threads)
    spec = build_spec(args, variant, tmp)
    logger.info(
        "variant %s: %d trials of %d epochs, shared_warmup=%s, rules %s",
        variant,
        spec.n_trials,
        spec.epochs,
        spec.shared_warmup,
        spec.rules.to_dict(),
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    storage = open_storage(spec.storage_url)
    study, _ = create_or_load_study(spec, storage)
    ensure_budget(study, spec)
    run_worker(spec, on_outcome=lambda o: logger.info("%s: %s", variant, format_outcome(o, spec.metrics)))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started

    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    values = {
        t.number: (float(t.values[0]), float(t.values[1]))
        for t in trials
        if t.state == TrialState.COMPLETE and t.values is not None
    }
    attr = study.user_attrs.get(layout.baseline_key(spec.trainer.train.seed)) or {}
    records = attr.get("records") or {}
    baseline_epochs = len(records.get("epoch", [])) if attr.get("state") == "complete" else 0
    curve = records.get("val_ppl") or []
    return VariantResult(
        name=variant,
        wall_s=wall,
        cpu_s=cpu,
        trial_epochs=sum(int(t.user_attrs.get(layout.EPOCHS_RUN, 0)) for t in trials),
        baseline_epochs=baseline_epochs,
        warmup_epochs=sum(int(t.user_attrs.get(layout.EPOCHS_FROM_WARMUP, 0)) for t in trials),
        states=states,
        params={t.number: dict(t.params) for t in trials},
        values=values,
        baseline_final_ppl=float(curve[-1]) if baseline_epochs and curve and curve[-1] is not None else None,
        points=list(values.values()),
    )


def _same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-12) if isinstance(a[k], float) else a[k] == b[k] for k in a
    )


def report(args: argparse.Namespace, results: dict[str, VariantResult]) -> str:
    finals = {r.baseline_final_ppl for r in results.values() if r.baseline_final_ppl is not None}
    if len(finals) > 1:
        logger.warning("the baseline runs of the variants differ: final val_ppl %s", sorted(finals))
    ref_ppl = args.ref_ppl or (REF_RATIO * min(finals) if finals else None)
    if ref_ppl is None:
        raise SystemExit("no variant ran the baseline, so give the reference point with --ref-ppl")
    reference = (ref_ppl, args.ref_nre)
    plain = results.get("plain")
    rows = []
    for r in results.values():
        hv = hypervolume_2d(r.points, reference)
        same_params = same_values = "-"
        if plain is not None and r is not plain:
            shared = [n for n in r.params if n in plain.params and _same_params(r.params[n], plain.params[n])]
            same_params = f"{len(shared)}/{len(r.params)}"
            both_complete = [n for n in shared if n in r.values and n in plain.values]
            same_values = f"{sum(r.values[n] == plain.values[n] for n in both_complete)}/{len(both_complete)}"
        rows.append(
            [
                r.name,
                f"{r.epochs} ({r.trial_epochs} + {r.baseline_epochs})",
                f"{100 * r.epochs / plain.epochs:.0f}%" if plain else "-",
                r.warmup_epochs,
                f"{r.states.get('COMPLETE', 0)} / {r.states.get('PRUNED', 0)} / {r.states.get('FAIL', 0)}",
                round(r.cpu_s),
                f"{100 * r.cpu_s / plain.cpu_s:.0f}%" if plain else "-",
                round(r.wall_s),
                hv,
                len(pareto_front(r.points)),
                r.best_ppl,
                same_params,
                same_values,
            ]
        )
    headers = [
        "variant",
        "epochs trained (trials + baseline)",
        "epochs vs plain",
        "epochs from warmup",
        "complete / pruned / failed",
        "CPU s",
        "CPU vs plain",
        "wall s",
        "hypervolume",
        "Pareto size",
        "best val_ppl",
        "params = plain",
        "values = plain",
    ]
    lines = [
        f"Measured: {machine_line()}",
        f"Study: studies/wikitext2.toml's space, TPE seed {args.seed}, {args.trials} trials x {args.epochs} "
        f"epochs, rules total_loss_max {args.rules[0]:g} / val_ppl_ratio_max {args.rules[1]:g}, start epoch "
        f"{args.start_low}..{args.start_high}, WikiText-2 ({args.data}) with vocab "
        f"{args.vocab}, seq {args.seq_len}, batch {args.batch_size}, d_model {args.d_model}, {args.n_layers} "
        f"layers, lr {args.lr:g}, {args.steps} steps per epoch, {args.eval_batches} validation batches, CPU, "
        f"{args.threads} torch thread(s) per variant, {args.jobs} variant(s) at a time.",
        f"Hypervolume reference point: val_ppl {ref_ppl:.4g} (1.3 x baseline final val_ppl), "
        f"val_koopman_nre {args.ref_nre:g}.",
        "",
        markdown_table(headers, rows),
        "",
        "params = plain: trials whose sampled parameters equal the plain variant's trial of the same number; "
        "values = plain: of those complete in both, how many have bit-identical objective values.",
    ]
    both = results.get("both")
    if plain is not None and both is not None:
        share = both.epochs / plain.epochs
        hv_plain, hv_both = hypervolume_2d(plain.points, reference), hypervolume_2d(both.points, reference)
        no_worse = hv_both >= hv_plain and both.best_ppl <= plain.best_ppl
        met = share <= GOAL_SHARE and no_worse
        lines += [
            "",
            f"Goal (both <= {GOAL_SHARE:.0%} of the plain epochs for a result no worse): "
            f"{'MET' if met else 'NOT MET'}: both spent {share:.0%} of the plain epochs "
            f"({both.epochs} vs {plain.epochs}); hypervolume {hv_both:.4g} vs {hv_plain:.4g}, best val_ppl "
            f"{both.best_ppl:.4g} vs {plain.best_ppl:.4g} ({'no worse' if no_worse else 'worse'}).",
        ]
    if args.details:
        lines += ["", per_trial_table(results)]
    return "\n".join(lines)


def per_trial_table(results: dict[str, VariantResult]) -> str:
    numbers = sorted({n for r in results.values() for n in r.params})
    headers = ["#", *[f"{r.name}: start, w_max, schedule, dim -> val_ppl / nre" for r in results.values()]]
    rows = []
    for n in numbers:
        row: list[Any] = [n]
        for r in results.values():
            p = r.params.get(n)
            if p is None:
                row.append("-")
                continue
            head = (
                f"{p.get('koopman_start_epoch')}, {p.get('koopman_weight_max', math.nan):.3g}, "
                f"{p.get('schedule')}, {p.get('koopman_dim')}"
            )
            v = r.values.get(n)
            row.append(f"{head} -> {v[0]:.4g} / {v[1]:.3g}" if v else f"{head} -> pruned/failed")
        rows.append(row)
    return markdown_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "wikitext-2"),
        help="WikiText-2 directory with train.txt / valid.txt / test.txt (default: %(default)s)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of %(default)s")
    p.add_argument("--trials", type=int, default=12, help="trials per study (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per trial (default: %(default)s)")
    p.add_argument("--start-low", type=int, default=1, help="lowest koopman_start_epoch (default: %(default)s)")
    p.add_argument("--start-high", type=int, default=4, help="highest koopman_start_epoch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default: %(default)s)")
    p.add_argument("--steps", type=int, default=15, help="max_steps_per_epoch (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=5, help="max_eval_batches (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=5000, help="vocabulary cap (user: 30000; default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=32, help="window length (user: 128; default: %(default)s)")
    p.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="learning rate (user: 1e-3; the short epochs need more to get the LM loss under the "
        "7.0 limit by the first Koopman epoch, as in the user's run; default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="batch size (user: 32; default: %(default)s)")
    p.add_argument("--d-model", type=int, default=64, help="model width (user: 64; default: %(default)s)")
    p.add_argument("--n-layers", type=int, default=4, help="blocks (user: 4; default: %(default)s)")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per variant; 1 keeps timings steady on a shared machine (default: %(default)s)",
    )
    p.add_argument("--jobs", type=int, default=4, help="variants run at the same time (default: %(default)s)")
    p.add_argument(
        "--ref-ppl",
        type=float,
        default=None,
        help="hypervolume reference val_ppl (default: 1.3 x the baseline's final val_ppl)",
    )
    p.add_argument("--ref-nre", type=float, default=1.0, help="hypervolume reference NRE (default: %(default)s)")
    p.add_argument(
        "--rules",
        default="7.0,1.3",
        metavar="TOTAL,RATIO",
        help="total_loss_max and val_ppl_ratio_max of the rules and both variants (default: the "
        "study file's %(default)s)",
    )
    p.add_argument("--details", action="store_true", help="also print every trial of every variant")
    p.add_argument("--verbose", action="store_true", help="show the search's and trainer's own INFO logs")
    args = p.parse_args(argv)
    try:
        total, ratio = (float(x) for x in args.rules.split(","))
    except ValueError:
        p.error(f"--rules must be two numbers like 7.0,1.3, but got {args.rules!r}")
    args.rules = (total, ratio)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants must be among {', '.join(VARIANTS)}, but got {unknown[0]!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from trainer.data import load_corpus

    load_corpus(f"files:{Path(args.data).resolve()}", args.vocab)  # tokenize (or hit the cache) before timing
    variants = args.variants.split(",")
    ctx = mp.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="bench-search-cost-") as tmp,
        ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=ctx, initializer=setup_logging, initargs=(args.verbose,)
        ) as pool,
    ):
        futures = {v: pool.submit(run_variant, args, v, Path(tmp)) for v in variants}
        results: dict[str, VariantResult] = {}
        for variant in variants:
            r = results[variant] = futures[variant].result()
            logger.info(
                "variant %s done: %d epochs (%d by the baseline), %.0f CPU s, %.0f wall s",
                variant,
                r.epochs,
                r.baseline_epochs,
                r.cpu_s,
                r.wall_s,
            )
    print(report(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
