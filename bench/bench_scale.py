"""Scale of a study: status, best and report on a study of 1,000 trials.

    .venv/bin/python bench/bench_scale.py                        # SQLite and PostgreSQL, 1,000 trials
    .venv/bin/python bench/bench_scale.py --backends sqlite --trials 200 --profile

The study is written through the product's own code paths, as a long run of studies/wikitext2.toml (10
epochs, the user's settings) would leave it: create_or_load_study stores the study file attr; the baseline
attr is ``MatchedBaseline.to_attr()`` under ``baseline_attr(spec)``; each trial's parameters come from
``spec.space.suggest`` (a seeded random sampler), its epoch records are synthetic numbers passed through
``records_to_columns``, its state comes from the real prune rules (``PruneRules.check`` epoch by epoch:
PRUNED with the rule's reason, else COMPLETE; a few FAIL and RUNNING ones), its user attrs are those a
worker writes (``search.storage.layout.finished_trial``), and it is stored with ``study.add_trials``; then
``annotate_trial`` writes its dashboard note, as ``koopman_search.search.workers.run_worker`` does.

Each command runs as a subprocess (``python -m koopman_search.search.cli ...``), as a user runs it, so the times include
the interpreter start and imports (the first row, ``--help``, is that floor). A command slower than
--profile-above seconds (or every command with --profile) is also run under cProfile in a fresh interpreter
(imports included), and the functions that dominate are printed.

Also timed, because a worker pays them once per trial at this size: the TPE sampler's ``suggest`` for trial
1,001, and ``annotate_trial`` (the dashboard note written when a trial finishes), mean of the last 50.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import math
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_POSTGRES,
    REPO,
    doc_parser,
    machine_line,
    markdown_table,
    postgres_scratch_db,
    setup_logging,
    study_file_dict,
)

logger = logging.getLogger("bench.scale")

NAME = "scale-wikitext2"
FAIL_SHARE = 0.03
RUNNING = 4  # the newest trials are still running


def build_spec(storage_url: str, artifacts: Path, n_trials: int) -> Any:
    from koopman_search.search.studyfile.spec import spec_from_dict

    d = copy.deepcopy(study_file_dict())
    d["study"].update(name=NAME, storage=storage_url, artifacts=str(artifacts), n_trials=n_trials)
    return spec_from_dict(d, origin="bench scale", base_dir=REPO / "studies")


def baseline_records(epochs: int, rng: random.Random) -> list[Any]:
    """A Koopman-off run shaped like the user's: LM loss from 7.6 down to about 6.1."""
    from koopman_search.trainer.records import EpochRecord

    records = []
    for e in range(1, epochs + 1):
        lm = 6.05 + 1.6 * math.exp(-(e - 1) / 2.2) + rng.gauss(0, 0.01)
        val = lm + 0.05
        records.append(
            EpochRecord(
                epoch=e,
                epochs=epochs,
                lm_loss=lm,
                koopman_loss=0.0,
                total_loss=lm,
                koopman_weight=0.0,
                effective_weight=0.0,
                fallback_batches=0,
                nonfinite_batches=0,
                val_loss=val,
                val_ppl=math.exp(val),
                val_koopman_nre=math.nan,
                seconds=78.0 + rng.gauss(0, 1),
                tokens_per_s=53000.0,
                steps=510,
            )
        )
    return records


def trial_records(spec: Any, params: dict[str, Any], base: list[Any], rng: random.Random) -> list[Any]:
    """Epochs 1..s are the baseline's (shared warmup); later ones add a Koopman loss that grows with the
    weight for some trials, so that the prune rules fire for a share of them."""
    from dataclasses import replace

    from koopman_search.trainer.records import EpochRecord
    from koopman_search.trainer.schedule import koopman_weight

    cfg = spec.trial_config(params)
    s = cfg.koopman.start_epoch
    level = rng.lognormvariate(1.0, 0.9)  # the trial's Koopman loss scale
    records = [replace(r) for r in base[:s]]
    for e in range(s + 1, spec.epochs + 1):
        b = base[e - 1]
        w = koopman_weight(e, cfg.koopman, spec.epochs)
        k = level * (1.0 + 0.3 * (e - s)) * rng.uniform(0.8, 1.2)
        cut = rng.randint(0, 3) if k > cfg.koopman.fallback_threshold else 0
        lm = b.lm_loss + 0.02 * w * k + rng.gauss(0, 0.01)
        val = b.val_loss + 0.03 * w * k + rng.gauss(0, 0.01)
        records.append(
            EpochRecord(
                epoch=e,
                epochs=spec.epochs,
                lm_loss=lm,
                koopman_loss=k,
                total_loss=lm + w * k,
                koopman_weight=w,
                effective_weight=w * (1 - cut / 510),
                fallback_batches=cut,
                nonfinite_batches=0,
                val_loss=val,
                val_ppl=math.exp(val),
                val_koopman_nre=min(1.0, 0.05 + 0.1 * k / (1 + w) * rng.uniform(0.5, 1.5)),
                seconds=96.0 + rng.gauss(0, 1),
                tokens_per_s=43000.0,
                steps=510,
            )
        )
    return records


def write_study(spec: Any, storage: Any, seed: int) -> dict[str, Any]:
    """The synthetic study, through the product's own writers. Returns timings of the writing and the
    trials' states."""
    import optuna
    from optuna.trial import TrialState

    from koopman_search.search.engine.baseline import baseline_attr
    from koopman_search.search.engine.study import create_or_load_study
    from koopman_search.search.pruning.rules import PruneRules
    from koopman_search.search.review.dashboard import annotate_trial
    from koopman_search.search.storage import layout

    rng = random.Random(seed)
    study, _ = create_or_load_study(spec, storage)
    base = baseline_records(spec.epochs, rng)
    checkpoints = {s: str(uuid.UUID(int=rng.getrandbits(128))) for s in range(2, 8)}
    baseline = layout.MatchedBaseline(tuple(r.val_ppl for r in base), "auto", tuple(base), checkpoints)
    study.set_user_attr(baseline_attr(spec), baseline.to_attr())
    rules = PruneRules.from_spec(spec.rules, baseline.val_ppl)

    sampler_study = optuna.create_study(directions=spec.directions, sampler=optuna.samplers.RandomSampler(seed))
    frozen: list[Any] = []
    states: dict[str, int] = {}
    n = spec.n_trials
    for i in range(n):
        trial = sampler_study.ask()
        sampled = spec.space.suggest(trial)
        distributions = trial.distributions
        if i < len(spec.enqueue):  # the study file's hand-tuned trials come first, with their labels
            params, label = dict(spec.enqueue[i].params), spec.enqueue[i].label
        else:
            params, label = sampled, None
        records = trial_records(spec, params, base, rng)
        s = int(params["koopman_start_epoch"])
        state, reason, fail = TrialState.COMPLETE, None, None
        if i >= n - RUNNING:
            state, records = TrialState.RUNNING, records[: rng.randint(s + 1, spec.epochs - 1)]
        for j, record in enumerate(records):
            why = rules.check(record)
            if why is not None:
                state, reason, records = TrialState.PRUNED, why, records[: j + 1]
                break
        if state == TrialState.COMPLETE and rng.random() < FAIL_SHARE:
            cut = rng.randint(s + 1, spec.epochs)
            state, fail, records = TrialState.FAIL, "RuntimeError: CUDA out of memory", records[:cut]
        states[state.name] = states.get(state.name, 0) + 1
        last = records[-1]
        values = [float(getattr(last, m)) for m in spec.metrics] if state == TrialState.COMPLETE else None
        worker = {"host": "gpu-node-1", "pid": 4000 + i % 8, "device": f"cuda:{i % 8}"}
        frozen.append(
            layout.finished_trial(
                state,
                params,
                distributions,
                records,
                epochs_from_warmup=s,
                values=values,
                label=label,
                prune_reason=reason,
                fail_reason=fail,
                checkpoint=str(uuid.UUID(int=rng.getrandbits(128))),
                extra={layout.WORKER: worker},
            )
        )
    started = time.perf_counter()
    for chunk in range(0, n, 100):
        study.add_trials(frozen[chunk : chunk + 100])
    add_s = time.perf_counter() - started
    logger.info("%d trials stored in %.1f s; writing their dashboard notes", n, add_s)
    note_times = []
    started = time.perf_counter()
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        t0 = time.perf_counter()
        annotate_trial(study, t, values=t.values, baseline_curve=baseline.val_ppl, rules=spec.rules)
        note_times.append(time.perf_counter() - t0)
    notes_s = time.perf_counter() - started
    last = note_times[-50:]
    return {
        "states": states,
        "add_trials_s": add_s,
        "notes_s": notes_s,
        "note_last50_s": sum(last) / max(1, len(last)),
        "note_first50_s": sum(note_times[:50]) / max(1, len(note_times[:50])),
    }


def time_suggest(spec: Any, storage: Any) -> float:
    """The study's own sampler (TPE, two objectives) proposing one more trial, as a worker does."""
    from optuna.trial import TrialState

    from koopman_search.search.engine.study import claim_waiting_trial, load_study

    study = load_study(storage, spec.name, spec=spec)
    study.enqueue_trial({})
    trial = claim_waiting_trial(study)
    if trial is None:
        raise RuntimeError("the trial just enqueued could not be claimed")
    started = time.perf_counter()
    spec.space.suggest(trial)
    elapsed = time.perf_counter() - started
    study.tell(trial, state=TrialState.FAIL)
    return elapsed


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "koopman_search.search.cli", "-q", *args]


def time_command(argv: list[str], check_json: bool) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(cli(argv), capture_output=True, text=True, env=env, cwd=REPO, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:1])} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    if check_json:
        json.loads(done.stdout)
    return elapsed, len(done.stdout)


def profile_command(argv: list[str], top: int, tmp: Path) -> str:
    """Run the command under cProfile in a fresh interpreter (imports included, as a user pays them); the
    top functions by cumulative and by own time."""
    out = tmp / "profile.out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "koopman_search.search.cli", "-q", *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"profiling {argv[0]} failed: {done.stderr.strip()[-500:]}")
    text = io.StringIO()
    stats = pstats.Stats(str(out), stream=text)
    stats.strip_dirs().sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def run_backend(args: argparse.Namespace, backend: str, tmp: Path) -> tuple[list[list[Any]], list[str]]:
    from koopman_search.search.storage.database import open_storage

    scratch = (
        postgres_scratch_db(args.postgres, "bench_scale")
        if backend == "postgresql"
        else nullcontext(f"sqlite:///{tmp / 'scale.db'}")
    )
    rows: list[list[Any]] = []
    profiles: list[str] = []
    with scratch as url:
        spec = build_spec(url, tmp / "artifacts", args.trials)
        storage = open_storage(url, heartbeat=False)
        logger.info("%s: writing a study of %d trials", backend, args.trials)
        writes = write_study(spec, storage, args.seed)
        target = ["--study-name", NAME, "--storage", url]
        out = tmp / f"report-{backend}.html"
        commands = [
            ("--help (interpreter + imports)", ["--help"], False),
            ("status --format json", ["status", *target, "--format", "json"], True),
            ("best --format json", ["best", *target, "--format", "json"], True),
            (f"report --out {out.name}", ["report", *target, "--out", str(out)], False),
        ]
        for title, argv, is_json in commands:
            times = []
            size = 0
            for _ in range(args.repeat):
                elapsed, size = time_command(argv, is_json)
                times.append(elapsed)
            if argv[0] == "report":
                size = out.stat().st_size
            best = min(times)
            rows.append([backend, title, round(best, 2), round(max(times), 2), f"{size / 1e6:.2f} MB"])
            logger.info("%s: %s %.2f s", backend, title, best)
            if argv[0] != "--help" and (args.profile or best > args.profile_above):
                profiles.append(
                    f"### {backend}: {title} ({best:.1f} s)\n\n```\n" + profile_command(argv, args.top, tmp) + "```"
                )
        suggest_s = time_suggest(spec, storage)
        rows.append([backend, f"TPE suggest for trial {args.trials + 1} (in process)", round(suggest_s, 2), "-", "-"])
        rows.append(
            [
                backend,
                "annotate_trial, mean of the first / last 50 (in process)",
                f"{writes['note_first50_s']:.3f} / {writes['note_last50_s']:.3f}",
                "-",
                "-",
            ]
        )
        rows.append(
            [
                backend,
                f"writing the study: add_trials / {args.trials} notes (in process)",
                f"{writes['add_trials_s']:.1f} / {writes['notes_s']:.1f}",
                "-",
                "-",
            ]
        )
        storage.engine.dispose()
    states = ", ".join(f"{v} {k.lower()}" for k, v in writes["states"].items())
    rows.append([backend, f"(the study: {states})", "-", "-", "-"])
    return rows, profiles


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument("--trials", type=int, default=1000, help="trials in the study (default: %(default)s)")
    p.add_argument("--backends", default="sqlite,postgresql", help="storages to test (default: %(default)s)")
    p.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES,
        help="a PostgreSQL server URL; a scratch database is made there (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic study (default: %(default)s)")
    p.add_argument(
        "--repeat", type=int, default=2, help="runs of each command; the best is shown (default: %(default)s)"
    )
    p.add_argument("--profile", action="store_true", help="profile every command, not only slow ones")
    p.add_argument(
        "--profile-above",
        type=float,
        default=10.0,
        help="profile a command slower than this many seconds (default: %(default)s)",
    )
    p.add_argument("--top", type=int, default=15, help="functions shown per profile (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show the search's own INFO logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    rows: list[list[Any]] = []
    profiles: list[str] = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            r, p = run_backend(args, backend, Path(tmp))
            rows += r
            profiles += p
    print(f"Measured: {machine_line()}")
    print(
        f"Study: {args.trials} synthetic trials of studies/wikitext2.toml (10 epochs each, two objectives), "
        "written through the product's code paths; commands run as `python -m koopman_search.search.cli -q ...` "
        f"subprocesses, best of {args.repeat}."
    )
    print()
    print(markdown_table(["storage", "command", "best s", "worst s", "output"], rows))
    for text in profiles:
        print()
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
