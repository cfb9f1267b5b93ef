"""What a study costs: one search space and budget searched several ways, side by side, over several seeds.

    .venv/bin/python -m pip install -e ".[bench]"                     # scipy (optuna-gp), syne-tune (syne-moasha)
    .venv/bin/python bench/bench_search_cost.py --trials 40 --variants plain,koopman-search,ks-min6,\
        one-epoch-topk,optuna-gp,optuna-hyperband,ks-2workers           # the run in BENCHMARKS.md
    .venv/bin/python bench/bench_search_cost.py --seeds 0 --trials 8 --epochs 5 --start-high 3   # a quick look

The study is studies/wikitext2.toml (its search space, TPE sampler, objectives val_ppl and val_linear_nre, rules
and pruner) on WikiText-2, shrunk so that the runs fit a CPU: a capped number of steps per epoch and of
validation batches, a smaller vocabulary and window (flags below). Every variant trains with the same trainer
(trainer.loop.HybridKoopmanTrainer) and the same budget of trials, one torch thread per process; ``--jobs``
runs go at a time, in separate processes, then the ``ks-2workers`` runs alone:

  plain               every trial to the end: no pruning, no shared warmup, rule limits 1e9 (never reached)
                      and a fixed baseline curve, so that no baseline run is spent (plain Optuna has none)
  koopman-search      the study file's own settings: shared warmup, the rules (7.0 / 1.3 against the auto
                      baseline), pruner = "asha" (eta and the first rung from the study file) and its
                      sampler ("tpe-rungs" since round 3 of BENCHMARKS.md; "tpe" before, now ks-tpe)
  ks-min6             the same with asha_min_trials = 6: a rung prunes only once 6 trials have a record there
  ks-random           the same as koopman-search with the random sampler: what TPE's learning adds
  ks-tpe              the same with sampler = "tpe" (plain TPE: a pruned trial is only "pruned" to it)
  ks-tpe-rungs        the same with sampler = "tpe-rungs": TPE fitted on the values trials reached at the
                      highest fidelity (end of training, else an asha rung) that enough trials reached
  ks-tpe-rungs-min6   tpe-rungs with asha_min_trials = 6
  ks-rung2            koopman-search with asha_min_epochs = 2: the first rung after two Koopman epochs
  ks-tpe-rungs-eta2   tpe-rungs with asha_reduction_factor = 2: rungs after 1, 2, 4 Koopman epochs, the top
                      half continuing at each (a high weight judged again after two epochs, as in ks-rung2,
                      after only one epoch paid by every trial)
  ks-tpe-rungs-eta4   tpe-rungs with asha_reduction_factor = 4: rungs after 1 and 4 Koopman epochs, the top
                      quarter continuing (fewer epochs, a sharper cut)
  one-epoch-topk      every trial one Koopman epoch (shared warmup from the baseline's checkpoints; TPE on the
                      one-epoch values), then the best 1/eta by non-dominated sorting and crowding at that epoch
                      continue to the end (Egele et al. 2023, "Is one epoch all you need ...")
  optuna-gp           koopman-search with Optuna's GPSampler (several objectives: log EHVI) in place of TPE
  optuna-hyperband    Optuna's HyperbandPruner (min_resource 1, max_resource = epochs, eta 3) on val_ppl alone
                      (single objective: its best case; Optuna prunes no multi-objective study), TPE, no
                      shared warmup, rule limits 1e9
  syne-moasha         Syne Tune's MOASHA (non-dominated sorting, grace period 1, eta 3) on both objectives,
                      driven from this script (its suggest, on_trial_result after every Koopman epoch, STOP)
  ks-2workers         koopman-search as a user runs it on this machine: `launch --workers 2 --threads 1` on
                      one study file, two processes sharing the study (asha decides on what the storage holds,
                      so its decisions are asynchronous); timed from outside, CPU time of the children

The product variants run through the real search code path (create_or_load_study, ensure_budget, run_worker
or the launch command) on their own SQLite study. Reported per variant, as mean and spread (min..max) over the
seeds (the sampler's seed; the trainer's seed is the study's, so the baseline is the same in every run):

  epochs    the trials' own epochs plus the baseline's; "vs plain" is the mean of the per-seed ratios
  CPU s     the process's CPU time (steady under load; wall time is shared-machine time)
  HV        the hypervolume of the Pareto front of (val_ppl, val_linear_nre) of the complete trials' last
            epochs, both minimised, reference point 1.3 x the baseline's final value of each: the user's
            accepted region for val_ppl, and blocks at most 30% less linear than the baseline's; "vs plain"
            as for epochs
  best      the lowest val_ppl of a complete trial

The numbers also go to bench/results/search_cost.json (``--json`` to change, ``--json ""`` for none). With
``--keep DIR`` every run's study stays in DIR; bench/replay_rungs.py replays pruning rules on plain's studies
and measures how well a rung's values predict the final ones.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import multiprocessing as mp
import re
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
    pareto_front,
    setup_logging,
    study_file_dict,
)

logger = logging.getLogger("bench.search_cost")

VARIANTS = (
    "plain",
    "koopman-search",
    "ks-min6",
    "ks-random",
    "ks-tpe",
    "ks-tpe-rungs",
    "ks-tpe-rungs-min6",
    "ks-rung2",
    "ks-tpe-rungs-eta2",
    "ks-tpe-rungs-eta4",
    "one-epoch-topk",
    "optuna-gp",
    "optuna-hyperband",
    "syne-moasha",
    "ks-2workers",
)
SOLO = ("ks-2workers",)  # runs alone, after the others: its two processes need the machine's two cores
OBJECTIVES = ("val_ppl", "val_linear_nre")  # studies/wikitext2.toml's
OFF_LIMIT = 1e9  # a rule limit no run reaches: the rule is off
REF = 1.3  # the hypervolume's reference point: 1.3 x the baseline's final value of each objective
GOAL_EPOCHS, GOAL_HV, GOAL_HV_WORST = 0.25, 0.98, 0.95  # <= 25% of plain's epochs at >= 98% (mean), 95% (worst)
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
    finals: list[tuple[float, float]]  # the objectives (OBJECTIVES) of the complete trials
    baseline_final_ppl: float | None = None
    baseline_final_nre: float | None = None
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
    if variant == "ks-tpe":
        study["sampler"] = "tpe"
    if variant in ("ks-min6", "ks-tpe-rungs-min6"):  # asha's rung decides from the 6th trial there on (2 x eta)
        study["asha_min_trials"] = 6
    if variant in ("ks-tpe-rungs", "ks-tpe-rungs-min6", "ks-tpe-rungs-eta2", "ks-tpe-rungs-eta4"):
        study["sampler"] = "tpe-rungs"
    if variant in ("ks-tpe-rungs-eta2", "ks-tpe-rungs-eta4"):
        study["asha_reduction_factor"] = int(variant[-1])
    if variant == "ks-rung2":  # a high weight gets two Koopman epochs to buy linearity before a rung judges it
        study["asha_min_epochs"] = 2
    if variant in ("plain", "optuna-hyperband"):
        for key in [k for k in study if k.startswith("asha_")]:
            del study[key]
        study.update(shared_warmup=False, pruner="none", sampler="tpe")  # plain Optuna: TPE, no pruner
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
    import optuna
    import torch

    from koopman_search.search.engine.study import create_or_load_study, ensure_budget
    from koopman_search.search.storage.database import open_storage
    from koopman_search.search.studyfile.spec import StudySpec
    from koopman_search.search.workers import run_worker

    torch.set_num_threads(args.threads)
    spec = build_spec(args, variant, seed, tmp)
    if variant == "optuna-gp":  # Optuna's GP sampler (log EHVI for several objectives) in place of TPE
        StudySpec.make_sampler = lambda self, seed_offset=0: optuna.samplers.GPSampler(  # type: ignore[method-assign]
            seed=self.sampler_seed + seed_offset
        )
    started, cpu_started = time.perf_counter(), time.process_time()
    storage = open_storage(spec.storage_url)
    study, _ = create_or_load_study(spec, storage)
    ensure_budget(study, spec)
    run_worker(
        spec,
        on_outcome=lambda o: logger.info("%s/%d: trial %d %s %s", variant, seed, o.number, o.state, o.reason or ""),
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return collect(variant, seed, spec, study, cpu, wall)


def collect(variant: str, seed: int, spec: Any, study: Any, cpu: float, wall: float) -> Run:
    """A finished study of the product as a :class:`Run`."""
    from optuna.trial import TrialState

    from koopman_search.search.storage import layout

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
            final = _finals_of(layout.trial_attrs(t).get(layout.RECORDS))
            if final is not None:
                finals.append(final)
    attr = layout.study_attrs(study).get(layout.baseline_key(spec.trainer.train.seed)) or {}
    records = attr.get("records") or {}
    baseline_epochs = len(records.get("epoch", [])) if attr.get("state") == "complete" else 0
    curve, nre = records.get("val_ppl") or [], records.get("val_linear_nre") or []
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
        baseline_final_nre=float(nre[-1]) if baseline_epochs and nre and nre[-1] is not None else None,
        pruned_by=pruned_by,
    )


def run_two_workers(args: argparse.Namespace, seed: int, tmp: Path) -> Run:
    """koopman-search as a user runs it on two cores: ``launch --workers 2 --threads 1`` on one study file
    (the study file's settings, as koopman-search's), timed from outside; CPU time is the children's."""
    import resource
    import subprocess

    import optuna
    import tomli_w

    spec = build_spec(args, "ks-2workers", seed, tmp)
    values = spec.to_dict()
    values["study"]["storage"] = spec.storage_url
    path = tmp / f"{spec.name}.toml"
    path.write_text(tomli_w.dumps(values))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    command = [sys.executable, "-m", "koopman_search.search.cli", "-q", "launch", str(path), "--workers", "2"]
    subprocess.run([*command, "--threads", "1"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage_url)
    return collect("ks-2workers", seed, spec, study, cpu, wall)


def run_one_epoch_topk(args: argparse.Namespace, seed: int, tmp: Path) -> Run:
    """Every trial trains one Koopman epoch (shared warmup: it starts from the baseline's checkpoint at its
    start epoch), then the best 1/eta of them, by non-dominated sorting and crowding of their values at that
    epoch (relative to the baseline's, as asha's rungs), continue to the last epoch (Egele et al. 2023). TPE
    (the study file's seed) proposes every trial from the one-epoch values seen so far."""
    import optuna
    import torch

    from koopman_search.search.pruning.asha import order_keys, rung_values
    from koopman_search.search.storage.layout import records_to_columns, round_significant
    from koopman_search.trainer.data import load_corpus
    from koopman_search.trainer.loop import HybridKoopmanTrainer

    torch.set_num_threads(args.threads)
    spec = build_spec(args, "one-epoch-topk", seed, tmp)
    corpus = load_corpus(spec.trainer.data.source, spec.trainer.data.vocab_size)
    started, cpu_started = time.perf_counter(), time.process_time()
    base_dir = tmp / f"{spec.name}-baseline"
    baseline = HybridKoopmanTrainer(spec.baseline_config, corpus)
    baseline.fit(checkpoint_dir=base_dir)
    base = baseline.records
    curves = {"val_linear_nre": [r.val_linear_nre for r in base]}
    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(directions=["minimize"] * len(OBJECTIVES), sampler=sampler)
    firsts: list[tuple[int, dict[str, Any], tuple[float, ...], Path]] = []
    trial_epochs = 0
    for number in range(args.trials):
        trial = study.ask()
        params = spec.space.suggest(trial)
        cfg = spec.trial_config(params)
        start = cfg.koopman.start_epoch
        trainer = HybridKoopmanTrainer(cfg, corpus)
        trainer.warm_start_from(base_dir / f"epoch_{start}.pt")
        own = tmp / f"{spec.name}-{number}"
        trainer.fit(callback=lambda record: True, checkpoint_dir=own)  # one epoch: start + 1
        trial_epochs += 1
        values = rung_values(
            records_to_columns(trainer.records), start + 1, OBJECTIVES, (1.0, 1.0), [r.val_ppl for r in base], curves
        )
        point = tuple(values) if values is not None else (math.nan,) * len(OBJECTIVES)
        if all(math.isfinite(v) for v in point):
            study.tell(trial, list(point))
        else:  # a NaN sorts last (order_keys) and teaches the sampler nothing
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        firsts.append((number, params, point, own / f"epoch_{start + 1}.pt"))
    keys = order_keys([f[2] for f in firsts])
    keep = max(1, len(firsts) // spec.asha.reduction_factor)
    order = sorted(range(len(firsts)), key=lambda i: keys[i])
    finals = []
    for i in order[:keep]:
        trainer = HybridKoopmanTrainer.from_checkpoint(firsts[i][3], corpus=corpus)
        done = trainer.epoch
        trainer.fit()
        trial_epochs += trainer.epoch - done
        last = trainer.records[-1]
        values = tuple(float(getattr(last, m)) for m in OBJECTIVES)
        if all(math.isfinite(v) for v in values):
            finals.append(values)
        logger.info("one-epoch-topk/%d: trial %d continued to epoch %d: %s", seed, firsts[i][0], last.epoch, values)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    states = {"COMPLETE": keep, "PRUNED": len(firsts) - keep}
    return Run(
        "one-epoch-topk", seed, cpu, wall, trial_epochs, len(base), states, finals,
        baseline_final_ppl=round_significant(base[-1].val_ppl),  # as the product stores it
        baseline_final_nre=round_significant(base[-1].val_linear_nre),
        pruned_by={"one-epoch": len(firsts) - keep},
    )  # fmt: skip


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
    if variant == "one-epoch-topk":
        return run_one_epoch_topk(args, seed, Path(tmp))
    if variant == "ks-2workers":
        return run_two_workers(args, seed, Path(tmp))
    return run_product(args, variant, seed, Path(tmp))


# ---- the report --------------------------------------------------------------------------------------------


def _spread(values: list[float], digits: int = 3, pct: bool = False) -> str:
    if not values:
        return "-"
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:.{digits}g}")
    mean = statistics.fmean(values)
    return f"{f(mean)} ({f(min(values))}..{f(max(values))})" if len(values) > 1 else f(mean)


def summarize(args: argparse.Namespace, runs: list[Run]) -> dict[str, Any]:
    finals = sorted({(r.baseline_final_ppl, r.baseline_final_nre) for r in runs if r.baseline_final_ppl is not None})
    if not finals or finals[0][1] is None:
        raise SystemExit("no run ran the baseline (include koopman-search), so the reference point is unknown")
    if len(finals) > 1:
        logger.warning("the baseline runs differ: final (val_ppl, val_linear_nre) %s", finals)
    b, b_nre = finals[0]
    reference = (REF * b, REF * float(b_nre or 0.0))
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
        "reference_point": {OBJECTIVES[0]: round(reference[0], 3), OBJECTIVES[1]: round(reference[1], 6)},
        "baseline_final_val_ppl": b,
        "baseline_final_val_linear_nre": b_nre,
        "variants": variants,
    }


def goal_lines(summary: dict[str, Any]) -> list[str]:
    """The goal, for each koopman-search variant, and where every other variant stands against it."""
    out = []
    for v in summary["variants"]:
        if not v.get("epochs_vs_plain") or v["variant"] == "plain":
            continue
        share = statistics.fmean(v["epochs_vs_plain"])
        hvs = [h for h in v["hypervolume_vs_plain"] if h is not None]
        hv, worst = (statistics.fmean(hvs), min(hvs)) if hvs else (math.nan, math.nan)
        met = share <= GOAL_EPOCHS and hv >= GOAL_HV and worst >= GOAL_HV_WORST
        mark = (
            ("MET" if met else "NOT MET") if v["variant"].startswith("ks") or v["variant"] == "koopman-search" else "-"
        )
        out.append(
            f"- {v['variant']}: {share:.1%} of plain's epochs at {hv:.1%} of its hypervolume (worst seed "
            f"{worst:.1%}); goal (<= {GOAL_EPOCHS:.0%}, >= {GOAL_HV:.0%}, worst >= {GOAL_HV_WORST:.0%}): {mark}"
        )
    return out


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
        f"Hypervolume of ({', '.join(OBJECTIVES)}), reference point ({ref[OBJECTIVES[0]]:.4g}, "
        f"{ref[OBJECTIVES[1]]:.4g}) = {REF:g} x the baseline's final values ({summary['baseline_final_val_ppl']:.4g}, "
        f"{summary['baseline_final_val_linear_nre']:.4g}).",
        "",
        markdown_table(headers, rows),
    ]
    lines += ["", *goal_lines(summary)]
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
    p.add_argument("--trials", type=int, default=40, help="trials per study (the user's 40; default: %(default)s)")
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
    p.add_argument(
        "--recover",
        metavar="DIR",
        help="summarize the finished runs left in the scratch directory DIR of an interrupted run (with --log, "
        "its stderr, for the CPU times) instead of running anything",
    )
    p.add_argument("--log", metavar="FILE", help="the interrupted run's stderr (with --recover)")
    p.add_argument(
        "--keep",
        metavar="DIR",
        help="keep every run's study (SQLite database and artifacts) in DIR, a new or empty folder, instead of a "
        "scratch folder removed at the end: bench/replay_rungs.py replays pruning rules on plain's studies",
    )
    p.add_argument(
        "--reuse",
        metavar="JSON",
        help="keep the runs of the variants not in --variants from this earlier result file (its settings must "
        "match this run's) and report them beside this run's",
    )
    p.add_argument(
        "--fronts",
        metavar="JSON",
        help="print the Pareto front of every run in this result file (variant, seed, then its (val_ppl, "
        "val_linear_nre) points) and run nothing",
    )
    p.add_argument(
        "--only-missing",
        action="store_true",
        help="with --reuse: keep the earlier runs of the variants in --variants too, and run only the (variant, "
        "seed) pairs the file lacks (e.g. two more seeds)",
    )
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants must be among {', '.join(VARIANTS)}, but got {unknown[0]!r}")
    if args.keep:
        keep = Path(args.keep)
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            p.error(f"--keep must name a new or empty folder, but {args.keep!r} holds files")
        keep.mkdir(parents=True, exist_ok=True)
    if args.only_missing and not args.reuse:
        p.error("--only-missing needs --reuse JSON: the earlier runs it keeps")
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


_DONE = re.compile(r"INFO bench\.search_cost: (\S+) seed (\d+) done: \d+ epochs, ([\d.]+) CPU s")


def recover(args: argparse.Namespace) -> list[Run]:
    """The finished runs of an interrupted benchmark, read back from its scratch directory (``--recover DIR``,
    left behind when the run is stopped with SIGTERM or SIGKILL) and, for CPU times, its log (``--log``):
    the product variants from their SQLite studies (every trial finished), one-epoch-topk from its trials'
    checkpoints (all of them one Koopman epoch or more, 1/eta of them to the end). A run still going is left
    out."""
    import optuna

    cpu: dict[tuple[str, int], float] = {}
    if args.log:
        for line in Path(args.log).read_text().splitlines():
            m = _DONE.search(line)
            if m:
                cpu[(m[1], int(m[2]))] = float(m[3])
    scratch, seed0 = Path(args.recover), int(study_file_dict()["trainer"]["train"]["seed"])
    spec = argparse.Namespace(trainer=argparse.Namespace(train=argparse.Namespace(seed=seed0)))
    runs = []
    for variant in args.variants.split(","):
        for seed in args.seeds:
            name = f"cost-{variant}-{seed}"
            if (scratch / f"{name}.db").exists():
                study = optuna.load_study(study_name=name, storage=f"sqlite:///{scratch / name}.db")
                if len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                                optuna.trial.TrialState.FAIL))) < args.trials:  # fmt: skip
                    continue
                run = collect(variant, seed, spec, study, cpu.get((variant, seed), math.nan), math.nan)
            elif variant == "one-epoch-topk" and (scratch / f"{name}-baseline" / "last.pt").exists():
                run = _recover_topk(args, scratch, name, seed, cpu.get((variant, seed), math.nan))
                if run is None:
                    continue
            else:
                continue
            runs.append(run)
            log_run(run)
    return runs


_CONTINUED = re.compile(r"one-epoch-topk/(\d+): trial (\d+) continued to epoch (\d+): \(([^,]+), ([^)]+)\)")


def _recover_topk(args: argparse.Namespace, scratch: Path, name: str, seed: int, cpu: float) -> Run | None:
    """A finished one-epoch-topk run: its trials' one-epoch checkpoints, and from the log (``--log``) the
    trials that continued to the end with their final values; None while unfinished."""
    from koopman_search.search.storage.layout import round_significant
    from koopman_search.trainer.checkpoint import read_checkpoint
    from koopman_search.trainer.records import EpochRecord

    base = [EpochRecord.from_dict(r) for r in read_checkpoint(scratch / f"{name}-baseline" / "last.pt")["records"]]
    starts = {
        int(d.name[len(name) + 1 :]): int(read_checkpoint(d / "last.pt")["config"]["koopman"]["start_epoch"])
        for d in scratch.glob(f"{name}-*")
        if d.name[len(name) + 1 :].isdigit()
    }
    continued = {}
    for line in Path(args.log).read_text().splitlines() if args.log else []:
        m = _CONTINUED.search(line)
        if m and int(m[1]) == seed:
            continued[int(m[2])] = (int(m[3]), (float(m[4]), float(m[5])))
    keep = max(1, args.trials // 3)
    if len(starts) < args.trials or len(continued) < keep:
        return None
    trained = len(starts) + sum(epoch - (starts[n] + 1) for n, (epoch, _) in continued.items())
    finals = [values for _, values in continued.values() if all(math.isfinite(v) for v in values)]
    return Run(
        "one-epoch-topk",
        seed,
        cpu,
        math.nan,
        trained,
        len(base),
        {"COMPLETE": len(continued), "PRUNED": len(starts) - len(continued)},
        finals,
        baseline_final_ppl=round_significant(base[-1].val_ppl),
        baseline_final_nre=round_significant(base[-1].val_linear_nre),
        pruned_by={"one-epoch": len(starts) - len(continued)},
    )


def log_run(run: Run) -> None:
    logger.info(
        "%s seed %d done: %d epochs, %.0f CPU s, states %s", run.variant, run.seed, run.epochs, run.cpu_s, run.states
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.fronts:
        print(fronts_text(json.loads(Path(args.fronts).read_text())))
        return 0
    variants = args.variants.split(",")
    if "syne-moasha" in variants:
        try:
            import syne_tune  # noqa: F401
        except ImportError:
            raise SystemExit('syne-moasha needs syne-tune: .venv/bin/python -m pip install -e ".[bench]"') from None
    reused = reuse(args) if args.reuse else []
    if args.recover:
        return finish(args, recover(args) + reused)
    from koopman_search.trainer.data import load_corpus

    load_corpus(f"files:{Path(args.data).resolve()}", args.vocab)  # tokenize (or hit the cache) before timing
    done = {(r.variant, r.seed) for r in reused}
    jobs = [(v, s) for s in args.seeds for v in variants if v not in SOLO and (v, s) not in done]
    solo = [(v, s) for s in args.seeds for v in variants if v in SOLO and (v, s) not in done]
    runs = []
    scratch = (
        contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="bench-search-cost-")
    )
    with scratch as tmp:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {job: pool.submit(run_one, args, job[0], job[1], tmp) for job in jobs}
            for future in futures.values():
                runs.append(future.result())
                log_run(runs[-1])
        for variant, seed in solo:  # alone on the machine: its wall clock is its own
            runs.append(run_one(args, variant, seed, tmp))
            log_run(runs[-1])
    return finish(args, runs + reused)


SIZE_SETTINGS = ("trials", "epochs", "start_low", "start_high", "steps", "eval_batches", "vocab", "seq_len", "lr",
                 "batch_size", "d_model", "n_layers", "n_heads", "threads")  # fmt: skip


def reuse(args: argparse.Namespace) -> list[Run]:
    """The runs of an earlier result file (``--reuse``) for the variants this run does not run, after
    checking that they were made with this run's sizes and seeds."""
    earlier = json.loads(Path(args.reuse).read_text())
    theirs = earlier["settings"]
    differ = [k for k in SIZE_SETTINGS if theirs.get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(
            f"--reuse {args.reuse}: its {differ[0]} is {theirs.get(differ[0])!r}, "
            f"this run's {getattr(args, differ[0])!r}"
        )
    running = set() if args.only_missing else set(args.variants.split(","))
    runs = []
    for entry in earlier["runs"]:
        if entry["variant"] in running or entry["seed"] not in args.seeds:
            continue
        entry = dict(entry, finals=[tuple(v) for v in entry["finals"]])
        runs.append(Run(**entry))
    logger.info("reused %d runs of %s from %s", len(runs), sorted({r.variant for r in runs}), args.reuse)
    return runs


def fronts_text(result: dict[str, Any]) -> str:
    """Each run's Pareto front of its final values, one line per run, by variant then seed."""
    lines = []
    for run in sorted(result["runs"], key=lambda r: (VARIANTS.index(r["variant"]), r["seed"])):
        front = pareto_front([(float(a), float(b)) for a, b in run["finals"]])
        points = ", ".join(f"({a:.1f}, {b:.4f})" for a, b in front)
        lines.append(f"{run['variant']} seed {run['seed']}: {points or '-'}")
    return "\n".join(lines)


def finish(args: argparse.Namespace, runs: list[Run]) -> int:
    baselines = {(r.baseline_final_ppl, r.baseline_final_nre) for r in runs if r.baseline_final_ppl is not None}
    if args.reuse and len(baselines) > 1:  # the trainer changed since the reused runs: they do not compare
        side = Path(tempfile.mkdtemp(prefix="bench-search-cost-runs-")) / "runs.json"
        side.write_text(json.dumps({"runs": [asdict(r) for r in runs]}, indent=1) + "\n")
        raise SystemExit(
            f"--reuse {args.reuse}: its runs ran another baseline (final val_ppl, val_linear_nre: "
            f"{sorted(baselines)}), so they do not compare with this run's; rerun them (this run's runs: {side})"
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
