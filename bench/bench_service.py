"""Service overhead: what the search adds around training, with 1, 2 and 4 workers, on SQLite and PostgreSQL.

    .venv/bin/python bench/bench_service.py
    .venv/bin/python bench/bench_service.py --backends sqlite --workers 1,2     # a quick look

For each storage and worker count, a study (studies/wikitext2.toml's space, sampler and shared warmup) is
created in a scratch SQLite file or a scratch PostgreSQL database (created on the server of --postgres and
dropped afterwards), and N worker processes run ``koopman_search.search.workers.run_worker`` on it, as
``koopman-search worker`` does. The model has the user's shapes (vocab 30000, d_model 64, 4 blocks, seq 128,
Koopman dim 128 or 256), so checkpoints have the user's size; but each epoch trains only a few small batches,
because the overhead does not depend on how long the steps take.

Nothing in the product is changed. Each worker process wraps product functions with timers before it
starts (the wrappers call the original and note the monotonic clock before and after):

  (a) between trials: from the end of one trial's training (HybridKoopmanTrainer.fit returns) to the first
      training batch of the worker's next trial. It covers finishing the trial (tell + dashboard note),
      the stale-trial check, claiming the next trial, sampling its parameters, building the trainer,
      downloading and loading the warmup checkpoint. Split into those parts; "other" is the rest (heartbeat
      thread stop, temporary directory clean-up, the trial's "worker" and "epochs_from_warmup" attrs).
  (b) per epoch record of a trial: save_checkpoint (torch.save of model + optimizers), upload_artifact,
      the user-attr writes (TrainingJob._write_attrs: records, checkpoint, train_seconds, epochs_run) and the
      removal of the previous checkpoint.

Rules are off (limits 1e9) so that every trial trains all its epochs and stores one record per epoch.
The share is against the user's trial: an epoch of 96 s with the Koopman loss on, 10 epochs = 960 s
(docs/design.md): share = (mean gap + 10 x mean storage per epoch) / 960 s.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import logging
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_POSTGRES,
    REPO,
    WIKITEXT2,
    doc_parser,
    machine_line,
    markdown_table,
    postgres_scratch_db,
    setup_logging,
    study_file_dict,
)

logger = logging.getLogger("bench.service")

OFF_LIMIT = 1e9
GAP_PARTS = ("finish", "stale_check", "claim", "suggest", "trainer_init", "download", "warm_start")
EPOCH_PARTS = ("save_checkpoint", "upload", "record_attrs", "remove_old")


def build_spec(args: argparse.Namespace, name: str, storage_url: str, artifacts: Path) -> Any:
    from koopman_search.search.studyfile.spec import spec_from_dict

    d = copy.deepcopy(study_file_dict())
    d["study"].update(name=name, storage=storage_url, artifacts=str(artifacts), n_trials=1, seed=0, shared_warmup=True)
    d["trainer"]["data"].update(source=f"files:{Path(args.data).resolve()}", batch_size=args.batch_size)
    d["trainer"]["train"].update(
        epochs=args.epochs, device="cpu", max_steps_per_epoch=args.steps, max_eval_batches=args.eval_batches
    )
    d["search"]["koopman_start_epoch"] = {"type": "int", "low": 1, "high": args.epochs - 1}
    d["enqueue"] = []
    d["rules"] = {"total_loss_max": OFF_LIMIT, "val_ppl_ratio_max": OFF_LIMIT}
    return spec_from_dict(d, origin=f"bench {name}", base_dir=REPO / "studies")


# ---- instrumentation (inside each worker process) ----------------------------------------------------------


class Timeline:
    """Timed calls of one worker process: (name, start, end, in_trial, cpu_start, cpu_end). Times are on the
    monotonic clock, one clock for every process of the machine; cpu is the process's CPU time."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float, bool, float, float]] = []
        self.in_trial = False

    def note(self, name: str, start: float, cpu_start: float) -> None:
        self.events.append((name, start, time.monotonic(), self.in_trial, cpu_start, time.process_time()))

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*a: Any, **kw: Any) -> Any:
            start, cpu = time.monotonic(), time.process_time()
            try:
                return original(*a, **kw)
            finally:
                self.note(name, start, cpu)

        setattr(owner, attr, timed)

    def wrap_trial(self, owner: Any, attr: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def trial(*a: Any, **kw: Any) -> Any:
            self.in_trial = True
            start, cpu = time.monotonic(), time.process_time()
            try:
                return original(*a, **kw)
            finally:
                self.note("trial", start, cpu)
                self.in_trial = False

        setattr(owner, attr, trial)

    def wrap_first_batch(self, owner: Any, attr: str) -> None:
        """Note when the first batch of each epoch is handed to the training step."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def batches(*a: Any, **kw: Any) -> Iterator[Any]:
            first = True
            for item in original(*a, **kw):
                if first:
                    self.note("first_batch", time.monotonic(), time.process_time())
                    first = False
                yield item

        setattr(owner, attr, batches)


def instrument() -> Timeline:
    import optuna.artifacts

    import koopman_search.search.engine.job
    import koopman_search.search.engine.runner
    import koopman_search.search.workers.loop
    from koopman_search.search.storage.database import Heartbeat
    from koopman_search.search.studyfile.space import SearchSpace
    from koopman_search.trainer.loop import HybridKoopmanTrainer

    tl = Timeline()
    tl.wrap_trial(koopman_search.search.engine.runner.TrialRunner, "run")
    tl.wrap(HybridKoopmanTrainer, "fit", "fit")
    tl.wrap_first_batch(HybridKoopmanTrainer, "_train_batches")
    tl.wrap(HybridKoopmanTrainer, "__init__", "trainer_init")
    tl.wrap(HybridKoopmanTrainer, "warm_start_from", "warm_start")
    tl.wrap(HybridKoopmanTrainer, "save_checkpoint", "save_checkpoint")
    tl.wrap(optuna.artifacts, "upload_artifact", "upload")
    tl.wrap(optuna.artifacts, "download_artifact", "download")
    tl.wrap(optuna.artifacts.FileSystemArtifactStore, "remove", "remove_old")
    tl.wrap(koopman_search.search.engine.job.TrainingJob, "_write_attrs", "record_attrs")
    tl.wrap(koopman_search.search.engine.runner.TrialRunner, "_finish", "finish")
    tl.wrap(koopman_search.search.workers.loop, "claim_waiting_trial", "claim")
    tl.wrap(koopman_search.search.workers.loop, "fail_stale_trials", "stale_check")
    tl.wrap(SearchSpace, "suggest", "suggest")
    tl.wrap(Heartbeat, "__exit__", "heartbeat_stop")
    return tl


def worker_main(args: argparse.Namespace, name: str, storage_url: str, artifacts: str, index: int, out: str) -> None:
    """One worker process: instrument, then run the worker loop like ``koopman-search worker``."""
    setup_logging(args.verbose)
    import torch

    torch.set_num_threads(1)
    tl = instrument()
    from koopman_search.search.workers import run_worker

    spec = build_spec(args, name, storage_url, Path(artifacts))
    started = time.monotonic()
    summary = run_worker(spec, seed_offset=index)
    Path(out).write_text(
        json.dumps(
            {
                "index": index,
                "started": started,
                "ended": time.monotonic(),
                "trials": len(summary.outcomes),
                "events": tl.events,
            }
        )
    )


# ---- analysis ----------------------------------------------------------------------------------------------


def _within(events: list[list[Any]], name: str, lo: float, hi: float) -> float:
    return sum(e[2] - e[1] for e in events if e[0] == name and e[1] >= lo and e[2] <= hi)


def analyse(workers: list[dict[str, Any]]) -> dict[str, Any]:
    gaps: list[float] = []
    gaps_cpu: list[float] = []
    parts: dict[str, list[float]] = {p: [] for p in (*GAP_PARTS, "other")}
    epoch_parts: dict[str, list[float]] = {p: [] for p in EPOCH_PARTS}
    per_epoch: list[float] = []
    per_epoch_cpu: list[float] = []
    baseline_end: float | None = None
    first_trial_steps: list[tuple[int, float]] = []
    for w in workers:
        ev = w["events"]
        fits = [e for e in ev if e[0] == "fit"]
        for e in fits:
            if not e[3]:
                baseline_end = e[2]
        trial_fits = [e for e in fits if e[3]]
        firsts = [e for e in ev if e[0] == "first_batch" and e[3]]
        if firsts:
            first_trial_steps.append((w["index"], firsts[0][1]))
        for done, nxt in itertools.pairwise(trial_fits):
            first = next((e for e in firsts if e[1] >= nxt[1]), None)
            if first is None:
                continue
            step = first[1]
            gap = step - done[2]
            gaps.append(gap)
            gaps_cpu.append(first[4] - done[5])
            known = 0.0
            for p in GAP_PARTS:
                t = _within(ev, p, done[2], step)
                parts[p].append(t)
                known += t
            parts["other"].append(gap - known)
        # per epoch record of a trial: its callback's storage steps, grouped from one save_checkpoint to the next
        groups: list[dict[str, float]] = []
        for e in sorted((e for e in ev if e[0] in EPOCH_PARTS and e[3]), key=lambda e: e[1]):
            if e[0] == "save_checkpoint":
                groups.append({p: 0.0 for p in (*EPOCH_PARTS, "cpu")})
            if groups:
                groups[-1][e[0]] += e[2] - e[1]
                groups[-1]["cpu"] += e[5] - e[4]
        for g in groups:
            for p in EPOCH_PARTS:
                epoch_parts[p].append(g[p])
            per_epoch.append(sum(g[p] for p in EPOCH_PARTS))
            per_epoch_cpu.append(g["cpu"])
    idle_after_baseline = [t - baseline_end for _, t in first_trial_steps if baseline_end is not None]
    return {
        "gaps": gaps,
        "gaps_cpu": gaps_cpu,
        "parts": parts,
        "epoch_parts": epoch_parts,
        "per_epoch": per_epoch,
        "per_epoch_cpu": per_epoch_cpu,
        "epochs": len(per_epoch),
        "idle_after_baseline": idle_after_baseline,
    }


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def run_config(args: argparse.Namespace, backend: str, n_workers: int, tmp: Path) -> dict[str, Any]:
    from koopman_search.search.engine.study import create_or_load_study, ensure_budget
    from koopman_search.search.storage.database import open_storage

    name = f"svc-{backend}-w{n_workers}"
    scratch = (
        postgres_scratch_db(args.postgres, f"bench_service_w{n_workers}")
        if backend == "postgresql"
        else nullcontext(f"sqlite:///{tmp / name}.db")
    )
    with scratch as url:
        artifacts = tmp / f"{name}-artifacts"
        spec = build_spec(args, name, url, artifacts)
        storage = open_storage(url, heartbeat=False)
        study, _ = create_or_load_study(spec, storage)
        ensure_budget(study, spec, n_workers * args.trials_per_worker)
        storage.engine.dispose()
        ctx = mp.get_context("spawn")
        outs = [tmp / f"{name}-{i}.json" for i in range(n_workers)]
        procs = [
            ctx.Process(target=worker_main, args=(args, name, url, str(artifacts), i, str(outs[i])))
            for i in range(n_workers)
        ]
        started = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.monotonic() - started
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise SystemExit(f"{name}: a worker exited with {bad[0]}; rerun with --verbose")
        workers = [json.loads(o.read_text()) for o in outs]
        storage = open_storage(url, heartbeat=False)
        from optuna.study import load_study

        states: dict[str, int] = {}
        for t in load_study(study_name=name, storage=storage).get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
        storage.engine.dispose()
    result = analyse(workers)
    result.update(backend=backend, workers=n_workers, wall=wall, states=states)
    logger.info(
        "%s: %d trials %s, %d gaps, %d epoch records, %.0f s",
        name,
        sum(states.values()),
        states,
        len(result["gaps"]),
        result["epochs"],
        wall,
    )
    return result


def _share(args: argparse.Namespace, gap: float, per_epoch: float) -> float:
    return (gap + args.user_epochs * per_epoch) / (args.epoch_seconds * args.user_epochs)


def report(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    trial_s = args.epoch_seconds * args.user_epochs
    rows = []
    for r in results:
        gap, per_epoch = _mean(r["gaps"]), _mean(r["per_epoch"])
        gap_cpu, per_epoch_cpu = _mean(r["gaps_cpu"]), _mean(r["per_epoch_cpu"])
        parts = ", ".join(
            f"{p} {_mean(r['parts'][p]):.2f}" for p in (*GAP_PARTS, "other") if _mean(r["parts"][p]) >= 0.005
        )
        eparts = ", ".join(f"{p} {1000 * _mean(r['epoch_parts'][p]):.0f}" for p in EPOCH_PARTS)
        idle = r["idle_after_baseline"]
        rows.append(
            [
                r["backend"],
                r["workers"],
                len(r["gaps"]),
                f"{gap:.2f} ({gap_cpu:.2f})",
                round(max(r["gaps"], default=0.0), 2),
                parts,
                r["epochs"],
                f"{1000 * per_epoch:.0f} ({1000 * per_epoch_cpu:.0f})",
                round(1000 * max(r["per_epoch"], default=0.0)),
                eparts,
                f"{100 * _share(args, gap, per_epoch):.2f}% ({100 * _share(args, gap_cpu, per_epoch_cpu):.2f}%)",
                f"{min(idle):.1f} / {max(idle):.1f}" if len(idle) > 1 else "-",
            ]
        )
    headers = [
        "storage",
        "workers",
        "gaps",
        "gap mean s (CPU s)",
        "gap max s",
        "gap parts (mean s)",
        "epoch records",
        "storage/epoch mean ms (CPU ms)",
        "max ms",
        "parts (mean ms)",
        f"share of a {trial_s:.0f} s trial (CPU)",
        "first step after baseline, min / max s",
    ]
    over = [
        f"{r['backend']} x{r['workers']}"
        for r in results
        if _share(args, _mean(r["gaps"]), _mean(r["per_epoch"])) >= 0.01
    ]
    lines = [
        f"Measured: {machine_line()}",
        f"Study: studies/wikitext2.toml's space and shared warmup, rules off; user model shapes (vocab 30000, "
        f"d_model 64, 4 blocks, seq 128, Koopman dim 128/256), batch {args.batch_size}, {args.steps} steps and "
        f"{args.eval_batches} validation batch(es) per epoch, {args.epochs} epochs, {args.trials_per_worker} "
        f"trials per worker; one worker = one process with 1 torch thread; CPU.",
        "",
        markdown_table(headers, rows),
        "",
        f"share = (gap mean + {args.user_epochs} x storage/epoch mean) / ({args.user_epochs} x "
        f"{args.epoch_seconds:g} s); in brackets the same from the worker process's CPU time, which does not "
        "count waiting (for a CPU core, a lock, the database). "
        + (
            "Goal < 1% of wall time: MET in every row."
            if not over
            else f"Goal < 1% of wall time: NOT MET in {', '.join(over)}."
        ),
        "The last column: time from the end of the baseline run to the first training step of each worker's "
        "first trial (workers that waited poll for the baseline with a growing sleep).",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument(
        "--data",
        default=str(WIKITEXT2),
        help="WikiText-2 directory (default: %(default)s)",
    )
    p.add_argument("--backends", default="sqlite,postgresql", help="storages to test (default: %(default)s)")
    p.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES,
        help="a PostgreSQL server URL; a scratch database is made there per run (default: %(default)s)",
    )
    p.add_argument("--workers", default="1,2,4", help="worker counts (default: %(default)s)")
    p.add_argument("--trials-per-worker", type=int, default=3, help="trials per worker (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="training batches per epoch (default: %(default)s)")
    p.add_argument("--eval-batches", type=int, default=1, help="validation batches (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="batch size (user: 32; default: %(default)s)")
    p.add_argument(
        "--epoch-seconds",
        type=float,
        default=96.0,
        help="the user's epoch with the Koopman loss on, s (docs/design.md; default: %(default)s)",
    )
    p.add_argument("--user-epochs", type=int, default=10, help="the user's epochs per trial (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show the search's own INFO logs")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error(f"--epochs must be >= 2 (one warmup epoch and one Koopman epoch), but got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from koopman_search.trainer.data import load_corpus

    load_corpus(f"files:{Path(args.data).resolve()}", 30000)  # tokenize (or hit the cache) before timing
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        for backend in args.backends.split(","):
            for n in (int(x) for x in args.workers.split(",")):
                results.append(run_config(args, backend, n, Path(tmp)))
    print(report(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
