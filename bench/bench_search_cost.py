"""What a study costs: one search space and budget searched five ways, side by side, over several seeds.

    .venv/bin/python bench/bench_search_cost.py                       # the default run (see --help for sizes)
    .venv/bin/python bench/bench_search_cost.py --seeds 0 --trials 8 --epochs 5 --start-high 3   # a quick look
    .venv/bin/python -m pip install -e ".[bench]"                     # syne-tune, for the syne-moasha variant

The study is studies/wikitext2.toml (its search space, TPE sampler, objectives val_ppl and
val_koopman_forward_ppl, rules and pruner) on WikiText-2, shrunk so that the runs fit a CPU: fewer trials,
a capped number of steps per epoch and of validation batches, a smaller vocabulary and window (flags below).
Every variant trains with the same trainer (trainer.loop.HybridKoopmanTrainer) and the same budget of
trials, one torch thread each; ``--jobs`` runs go at a time, in separate processes:

  plain               every trial to the end: no pruning, no shared warmup, rule limits 1e9 (never reached)
                      and a fixed baseline curve, so that no baseline run is spent (plain Optuna has none)
  koopman-search      the study file's own settings: shared warmup, the rules (7.0 / 1.3 against the auto
                      baseline) and pruner = "asha" (η and the first rung from the study file)
  ks-random           the same with the random sampler: what TPE's learning from the history (pruned trials
                      included, see docs/asha.md) adds at this budget
  optuna-hyperband    Optuna's HyperbandPruner (min_resource 1, max_resource = epochs, η 3) on val_ppl alone
                      (single objective: its best case; Optuna prunes no multi-objective study), TPE, no
                      shared warmup, rule limits 1e9
  syne-moasha         Syne Tune's MOASHA (non-dominated sorting, grace period 1, η 3) on both objectives,
                      driven from this script: its scheduler's ``suggest`` proposes the configuration (random,
                      as MOASHA does), each epoch's record goes to ``on_trial_result`` and a STOP ends the trial.
                      Its time attribute is the Koopman epoch (epochs since the trial's start epoch): the
                      Koopman metrics do not exist before it. Every trial trains from epoch 0.

The first four run through the real search code path (create_or_load_study, ensure_budget, run_worker) on
their own SQLite study. Reported per variant, as mean and spread (min..max) over the seeds (the sampler's
seed; the trainer's seed is the study's, so the baseline is the same in every run):

  epochs    the trials' own epochs plus the baseline's; "vs plain" is the mean of the per-seed ratios
  CPU s     the process's CPU time (steady under load; wall time is shared-machine time)
  HV        the hypervolume of the Pareto front of (val_ppl, val_koopman_forward_ppl) of the complete
            trials' last epochs, both minimised, reference point (1.3 × b, 2 × b) with b the baseline's final
            val_ppl: the user's accepted region for val_ppl, and a Koopman model at most twice as perplexed;
            "vs plain" as for epochs
  best      the lowest val_ppl of a complete trial

The numbers also go to bench/results/search_cost.json (``--json`` to change, ``--json ""`` for none).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    WIKITEXT2,
    doc_parser,
    hypervolume_2d,
    machine_line,
    markdown_table,
    setup_logging,
    study_file_dict,
)

logger = logging.getLogger("bench.search_cost")

VARIANTS = ("plain", "koopman-search", "ks-random", "optuna-hyperband", "syne-moasha")
PRODUCT_VARIANTS = VARIANTS[:4]
OBJECTIVES = ("val_ppl", "val_koopman_forward_ppl")
OFF_LIMIT = 1e9  # a rule limit no run reaches: the rule is off
REF_PPL, REF_FORWARD = 1.3, 2.0  # the hypervolume's reference point, times the baseline's final val_ppl
GOAL_EPOCHS, GOAL_HV = 0.30, 0.98  # the goal: <= 30% of plain's epochs at >= 98% of its hypervolume
RESULTS = REPO / "bench" / "results" / "search_cost.json"


@dataclass
class Run:
    variant: str
    seed: int
    cpu_s: float
    wall_s: float
    trial_epochs: int
    baseline_epochs: int
    states: dict[str, int]
    finals: list[tuple[float, float]]  # (val_ppl, val_koopman_forward_ppl) of the complete trials
    baseline_final_ppl: float | None = None
    pruned_by: dict[str, int] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return self.trial_epochs + self.baseline_epochs

    @property
    def best_ppl(self) -> float:
        return min((v[0] for v in self.finals), default=math.nan)


def base_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The study file with this benchmark's sizes."""
    d = copy.deepcopy(study_file_dict())
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
    d["study"]["n_trials"] = args.trials
    d["enqueue"] = []  # every trial comes from the sampler, in every variant
    return d


def build_spec(args: argparse.Namespace, variant: str, seed: int, tmp: Path) -> Any:
    """The variant's study, validated by the product."""
    from koopman_search.search.studyfile.spec import spec_from_dict

    d = base_dict(args)
    name = f"cost-{variant}-{seed}"
    study = d["study"]
    study.update(name=name, storage=f"sqlite:///{tmp / name}.db", artifacts=str(tmp / f"{name}-artifacts"), seed=seed)
    if variant == "ks-random":
        study["sampler"] = "random"
    if variant in ("plain", "optuna-hyperband"):
        for key in [k for k in study if k.startswith("asha_")]:
            del study[key]
        study.update(shared_warmup=False, pruner="none")
        d["rules"] = {"total_loss_max": OFF_LIMIT, "val_ppl_ratio_max": OFF_LIMIT}
        d["baseline"] = {"val_ppl": [1.0] * args.epochs}  # only the (off) ratio rule reads it
    if variant == "optuna-hyperband":
        study.update(pruner="hyperband", objectives=[{"metric": "val_ppl", "direction": "minimize"}])
    return spec_from_dict(d, origin=f"bench {name}", base_dir=REPO / "studies")


def _finals_of(columns: dict[str, list[Any]] | None) -> tuple[float, float] | None:
    if not columns or not columns.get("epoch"):
        return None
    values = tuple(columns[m][-1] for m in OBJECTIVES)
    return None if any(v is None for v in values) else (float(values[0]), float(values[1]))


def run_product(args: argparse.Namespace, variant: str, seed: int, tmp: Path) -> Run:
    import torch
    from optuna.trial import TrialState

    from koopman_search.search.engine.study import create_or_load_study, ensure_budget
    from koopman_search.search.storage import layout
    from koopman_search.search.storage.database import open_storage
    from koopman_search.search.workers import run_worker

    torch.set_num_threads(args.threads)
    spec = build_spec(args, variant, seed, tmp)
    started, cpu_started = time.perf_counter(), time.process_time()
    storage = open_storage(spec.storage_url)
    study, _ = create_or_load_study(spec, storage)
    ensure_budget(study, spec)
    run_worker(
        spec,
        on_outcome=lambda o: logger.info("%s/%d: trial %d %s %s", variant, seed, o.number, o.state, o.reason or ""),
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    pruned_by: dict[str, int] = {}
    finals = []
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
        if t.state == TrialState.PRUNED:
            by = str(t.user_attrs.get(layout.PRUNED_BY) or "rules")
            pruned_by[by] = pruned_by.get(by, 0) + 1
        if t.state == TrialState.COMPLETE:
            final = _finals_of(t.user_attrs.get(layout.RECORDS))
            if final is not None:
                finals.append(final)
    attr = layout.study_attrs(study).get(layout.baseline_key(spec.trainer.train.seed)) or {}
    records = attr.get("records") or {}
    baseline_epochs = len(records.get("epoch", [])) if attr.get("state") == "complete" else 0
    curve = records.get("val_ppl") or []
    return Run(
        variant=variant,
        seed=seed,
        cpu_s=cpu,
        wall_s=wall,
        trial_epochs=sum(int(t.user_attrs.get(layout.EPOCHS_RUN, 0)) for t in trials),
        baseline_epochs=baseline_epochs,
        states=states,
        finals=finals,
        baseline_final_ppl=float(curve[-1]) if baseline_epochs and curve and curve[-1] is not None else None,
        pruned_by=pruned_by,
    )


def syne_config_space(space: Any) -> dict[str, Any]:
    """Our search space in Syne Tune's terms."""
    from syne_tune.config_space import choice, lograndint, loguniform, randint, uniform

    from koopman_search.search.studyfile.space import CategoricalParam, FixedParam, FloatParam, IntParam

    out: dict[str, Any] = {}
    for name, p in space.params.items():
        if isinstance(p, FloatParam):
            if p.step is not None:
                raise SystemExit(f"syne-moasha: a float step is not mapped, but {name} has step={p.step}")
            out[name] = loguniform(p.low, p.high) if p.log else uniform(p.low, p.high)
        elif isinstance(p, IntParam):
            if p.step != 1:
                raise SystemExit(f"syne-moasha: an int step is not mapped, but {name} has step={p.step}")
            out[name] = lograndint(p.low, p.high) if p.log else randint(p.low, p.high)
        elif isinstance(p, CategoricalParam):
            out[name] = choice(list(p.choices))
        elif isinstance(p, FixedParam):
            out[name] = p.value
    return out


def run_moasha(args: argparse.Namespace, seed: int, tmp: Path) -> Run:
    """Syne Tune's MOASHA scheduler deciding after every Koopman epoch of our trainer (one trial at a time,
    as our single worker runs them)."""
    import numpy as np
    import torch
    from syne_tune.backend.trial_status import Trial
    from syne_tune.optimizer.scheduler import SchedulerDecision
    from syne_tune.optimizer.schedulers.multiobjective.moasha import MOASHA

    from koopman_search.trainer.loop import HybridKoopmanTrainer

    torch.set_num_threads(args.threads)
    spec = build_spec(args, "plain", seed, tmp)
    np.random.seed(seed)  # MOASHA's suggest() samples its config space with numpy's global generator
    scheduler = MOASHA(
        config_space=syne_config_space(spec.space),
        metrics=list(OBJECTIVES),
        do_minimize=True,
        time_attr="koopman_epoch",
        max_t=args.epochs - args.start_low,
        grace_period=1,
        reduction_factor=3,
        random_seed=seed,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    states = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    finals, trial_epochs = [], 0
    for number in range(args.trials):
        suggestion = scheduler.suggest()
        config = dict(suggestion.config)
        trial = Trial(trial_id=number, config=config, creation_time=None)
        scheduler.on_trial_add(trial)
        params = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()}
        trainer = HybridKoopmanTrainer(spec.trial_config(params))
        start = int(params.get("koopman_start_epoch", spec.trainer.koopman.start_epoch))
        stopped: list[int] = []

        def on_epoch(record: Any, start: int = start, trial: Trial = trial, stopped: list[int] = stopped) -> bool:
            k = record.epoch - start
            if k < 1 or record.epoch >= args.epochs:
                return False
            result = {"koopman_epoch": k, **{m: float(getattr(record, m)) for m in OBJECTIVES}}
            if any(not math.isfinite(v) for v in result.values()):
                stopped.append(record.epoch)
                return True
            if scheduler.on_trial_result(trial, result) == SchedulerDecision.STOP:
                stopped.append(record.epoch)
                return True
            return False

        try:
            trainer.fit(callback=on_epoch)
        except Exception as exc:  # as our workers do: a failing trial does not stop the study
            logger.warning("syne-moasha/%d: trial %d failed: %s", seed, number, exc)
            states["FAIL"] += 1
            trial_epochs += trainer.epoch
            continue
        trial_epochs += trainer.epoch
        last = trainer.records[-1]
        if stopped:
            states["PRUNED"] += 1
        else:
            states["COMPLETE"] += 1
            values = tuple(float(getattr(last, m)) for m in OBJECTIVES)
            scheduler.on_trial_complete(
                trial, {"koopman_epoch": last.epoch - start, **dict(zip(OBJECTIVES, values, strict=True))}
            )
            if all(math.isfinite(v) for v in values):
                finals.append(values)
        logger.info(
            "syne-moasha/%d: trial %d %s after epoch %d", seed, number, "PRUNED" if stopped else "COMPLETE", last.epoch
        )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return Run("syne-moasha", seed, cpu, wall, trial_epochs, 0, states, finals, pruned_by={"moasha": states["PRUNED"]})


def run_one(args: argparse.Namespace, variant: str, seed: int, tmp: str) -> Run:
    setup_logging(args.verbose)
    if variant == "syne-moasha":
        return run_moasha(args, seed, Path(tmp))
    return run_product(args, variant, seed, Path(tmp))


# ---- the report --------------------------------------------------------------------------------------------


def _spread(values: list[float], digits: int = 3, pct: bool = False) -> str:
    if not values:
        return "-"
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.{digits}g}")
    mean = statistics.fmean(values)
    return f"{f(mean)} ({f(min(values))}..{f(max(values))})" if len(values) > 1 else f(mean)


def summarize(args: argparse.Namespace, runs: list[Run]) -> dict[str, Any]:
    finals = sorted({r.baseline_final_ppl for r in runs if r.baseline_final_ppl is not None})
    if not finals:
        raise SystemExit("no run ran the baseline (include koopman-search), so the reference point is unknown")
    if len(finals) > 1:
        logger.warning("the baseline runs differ: final val_ppl %s", finals)
    b = finals[0]
    reference = (REF_PPL * b, REF_FORWARD * b)
    plain = {r.seed: r for r in runs if r.variant == "plain"}
    variants = []
    for variant in [v for v in VARIANTS if any(r.variant == v for r in runs)]:
        mine = sorted((r for r in runs if r.variant == variant), key=lambda r: r.seed)
        hv = [hypervolume_2d(r.finals, reference) for r in mine]
        entry: dict[str, Any] = {
            "variant": variant,
            "seeds": [r.seed for r in mine],
            "epochs": [r.epochs for r in mine],
            "baseline_epochs": [r.baseline_epochs for r in mine],
            "cpu_s": [round(r.cpu_s, 1) for r in mine],
            "wall_s": [round(r.wall_s, 1) for r in mine],
            "hypervolume": [round(h, 4) for h in hv],
            "best_val_ppl": [round(r.best_ppl, 3) for r in mine],
            "states": [r.states for r in mine],
            "pruned_by": [r.pruned_by for r in mine],
        }
        if plain:
            pairs = [(r, h) for r, h in zip(mine, hv, strict=True) if r.seed in plain]
            entry["epochs_vs_plain"] = [round(r.epochs / plain[r.seed].epochs, 4) for r, _ in pairs]
            entry["cpu_vs_plain"] = [round(r.cpu_s / plain[r.seed].cpu_s, 4) for r, _ in pairs]
            entry["hypervolume_vs_plain"] = [
                round(h / hypervolume_2d(plain[r.seed].finals, reference), 4) if plain[r.seed].finals else None
                for r, h in pairs
            ]
        variants.append(entry)
    return {
        "machine": machine_line(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "verbose", "jobs")},
        "reference_point": {"val_ppl": round(reference[0], 3), "val_koopman_forward_ppl": round(reference[1], 3)},
        "baseline_final_val_ppl": b,
        "variants": variants,
    }


def report(summary: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for v in summary["variants"]:
        states = [f"{s.get('COMPLETE', 0)}/{s.get('PRUNED', 0)}/{s.get('FAIL', 0)}" for s in v["states"]]
        rows.append(
            [
                v["variant"],
                _spread([float(e) for e in v["epochs"]]),
                _spread(v.get("epochs_vs_plain", []), pct=True),
                _spread(v["cpu_s"]),
                _spread(v.get("cpu_vs_plain", []), pct=True),
                _spread(v["hypervolume"], 4),
                _spread([h for h in v.get("hypervolume_vs_plain", []) if h is not None], pct=True),
                _spread(v["best_val_ppl"], 4),
                ", ".join(states),
            ]
        )
    headers = [
        "variant",
        "epochs (mean, min..max)",
        "epochs vs plain",
        "CPU s",
        "CPU vs plain",
        "hypervolume",
        "HV vs plain",
        "best val_ppl",
        "complete/pruned/failed per seed",
    ]
    ref = summary["reference_point"]
    lines = [
        f"Measured: {summary['machine']}",
        f"Study: studies/wikitext2.toml's space, objectives, rules and pruner; {args.trials} trials x {args.epochs} "
        f"epochs, start epoch {args.start_low}..{args.start_high}, sampler seeds {args.seeds}; WikiText-2 with "
        f"vocab {args.vocab}, seq {args.seq_len}, batch {args.batch_size}, d_model {args.d_model}, "
        f"{args.n_layers} layers, lr {args.lr:g}, {args.steps} steps per epoch, {args.eval_batches} validation "
        f"batches; CPU, {args.threads} torch thread(s) per run, {args.jobs} run(s) at a time.",
        f"Hypervolume of (val_ppl, val_koopman_forward_ppl), reference point ({ref['val_ppl']:.4g}, "
        f"{ref['val_koopman_forward_ppl']:.4g}) = ({REF_PPL:g}, {REF_FORWARD:g}) x the baseline's final val_ppl "
        f"{summary['baseline_final_val_ppl']:.4g}.",
        "",
        markdown_table(headers, rows),
    ]
    ks = next((v for v in summary["variants"] if v["variant"] == "koopman-search"), None)
    if ks is not None and ks.get("epochs_vs_plain"):
        share = statistics.fmean(ks["epochs_vs_plain"])
        hvs = [h for h in ks["hypervolume_vs_plain"] if h is not None]
        hv = statistics.fmean(hvs) if hvs else math.nan
        met = share <= GOAL_EPOCHS and hv >= GOAL_HV
        lines += [
            "",
            f"Goal (koopman-search <= {GOAL_EPOCHS:.0%} of plain's epochs at >= {GOAL_HV:.0%} of its hypervolume): "
            f"{'MET' if met else 'NOT MET'}: {share:.1%} of the epochs, {hv:.1%} of the hypervolume "
            "(means over seeds).",
        ]
        for peer in ("optuna-hyperband", "syne-moasha"):
            p = next((v for v in summary["variants"] if v["variant"] == peer), None)
            if p is None or not p.get("epochs_vs_plain"):
                continue
            p_hv = [h for h in p["hypervolume_vs_plain"] if h is not None]
            lines.append(
                f"- against {peer}: {statistics.fmean(p['epochs_vs_plain']):.1%} of the epochs at "
                f"{(statistics.fmean(p_hv) if p_hv else math.nan):.1%} of the hypervolume"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument(
        "--data",
        default=str(WIKITEXT2),
        help="WikiText-2 directory with train.txt / valid.txt / test.txt (default: %(default)s)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of %(default)s")
    p.add_argument("--seeds", default="0,1,2", help="the sampler's seeds, one run each (default: %(default)s)")
    p.add_argument("--trials", type=int, default=24, help="trials per study (user: 40; default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per trial (user: 10; default: %(default)s)")
    p.add_argument("--start-low", type=int, default=2, help="lowest koopman_start_epoch (default: %(default)s)")
    p.add_argument("--start-high", type=int, default=7, help="highest koopman_start_epoch (default: %(default)s)")
    p.add_argument("--steps", type=int, default=15, help="max_steps_per_epoch (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=5, help="max_eval_batches (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=5000, help="vocabulary cap (user: 30000; default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=32, help="window length (user: 128; default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (user: 1e-3; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (user: 32; default: %(default)s)")
    p.add_argument("--d-model", type=int, default=64, help="model width (user: 64; default: %(default)s)")
    p.add_argument("--n-layers", type=int, default=4, help="blocks (user: 4; default: %(default)s)")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="runs at the same time (default: %(default)s)")
    p.add_argument("--json", default=str(RESULTS), help="where the numbers go ('' for nowhere; default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show the search's and trainer's own INFO logs")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants must be among {', '.join(VARIANTS)}, but got {unknown[0]!r}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be integers separated by commas, but got {args.seeds!r}")
    if not 1 <= args.start_low <= args.start_high < args.epochs:
        p.error(
            f"--start-low <= --start-high < --epochs must hold, but got "
            f"{args.start_low}, {args.start_high}, {args.epochs}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    variants = args.variants.split(",")
    if "syne-moasha" in variants:
        try:
            import syne_tune  # noqa: F401
        except ImportError:
            raise SystemExit('syne-moasha needs syne-tune: .venv/bin/python -m pip install -e ".[bench]"') from None
    from koopman_search.trainer.data import load_corpus

    load_corpus(f"files:{Path(args.data).resolve()}", args.vocab)  # tokenize (or hit the cache) before timing
    jobs = [(v, s) for s in args.seeds for v in variants]
    with (
        tempfile.TemporaryDirectory(prefix="bench-search-cost-") as tmp,
        ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool,
    ):
        futures = {job: pool.submit(run_one, args, job[0], job[1], tmp) for job in jobs}
        runs = []
        for job, future in futures.items():
            run = future.result()
            runs.append(run)
            logger.info(
                "%s seed %d done: %d epochs, %.0f CPU s, states %s", job[0], job[1], run.epochs, run.cpu_s, run.states
            )
    summary = summarize(args, runs)
    summary["runs"] = [asdict(r) for r in runs]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
