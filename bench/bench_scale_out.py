"""Many workers on one study: 16, 32 and 64 worker processes on PostgreSQL directly and through the proxy.

Each worker is a process that does what a trial runner does to the storage (search/engine/runner.py), with a
stand-in trainer that sleeps: it looks for stale trials and claims a WAITING trial with the product's
functions (``fail_stale_trials``, ``claim_waiting_trial``), beats (``Heartbeat``) while the trial "trains",
writes the runner's user attrs after every epoch (records in columns, train seconds, checkpoint, epochs
run) and a checkpoint's system attr, and finishes with ``study.tell``; when the queue is empty and nothing
runs it stops, as ``run_worker`` does. The study is the WikiText-2 study file's, its budget queued by
``create_or_load_study`` and ``ensure_budget``; the proxy is the ``koopman-search storage-proxy`` command.

Measured per run: trials finished per second, claim latency (stale check + claim), the main loop's time in
storage calls per trial and its share of a 960 s trial (the user's 10 epochs of about 96 s), the most
connections to the study's database at once (pg_stat_activity, sampled every 0.25 s), errors (storage
calls retried or failed, workers that exited non-zero), and trials claimed twice or never finished.

The stand-in trials are short (10 epochs of --epoch-seconds), so the workers hit the storage far more often
than real trials would: 64 workers finishing a 960 s trial each make about 3 storage calls per second in
all, here they make a few hundred. The storage times are upper bounds for real trials.

    .venv/bin/python bench/bench_scale_out.py                     # 16, 32, 64 workers; direct and proxy
    .venv/bin/python bench/bench_scale_out.py --workers 8 --storages proxy --trials-per-worker 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    DEFAULT_POSTGRES,
    REPO,
    doc_parser,
    machine_line,
    markdown_table,
    postgres_scratch_db,
    setup_logging,
    study_file_dict,
)

logger = logging.getLogger("bench.scale_out")

NAME = "scale-out"
TRIAL_SECONDS_REAL = 960.0  # the user's trial: 10 epochs of about 96 s
RESULTS = REPO / "bench" / "results" / "scale_out.json"
KOOPMAN_SEARCH = str(Path(sys.executable).parent / "koopman-search")


# ---- one worker process --------------------------------------------------------------------------------


class _RetryCounter(logging.Handler):
    """Counts the storage calls that ``search.storage.retry.retrying`` had to retry (one warning each)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.messages) < 5:
            self.messages.append(record.getMessage())


def _records(epoch: int, epochs: int) -> list[Any]:
    from koopman_search.trainer.records import EpochRecord

    return [
        EpochRecord(
            epoch=e,
            epochs=epochs,
            lm_loss=6.5,
            koopman_loss=0.3,
            total_loss=6.6,
            koopman_weight=0.1,
            effective_weight=0.1,
            fallback_batches=0,
            nonfinite_batches=0,
            val_loss=6.6,
            val_ppl=735.1,
            val_koopman_nre=0.2,
            seconds=96.0,
            tokens_per_s=53000.0,
            steps=510,
        )
        for e in range(1, epoch + 1)
    ]


def _run_trial(study: Any, storage: Any, trial: Any, epochs: int, epoch_seconds: float, values: list[float]) -> float:
    """One stand-in trial, storage calls as the trial runner makes them; the seconds spent in them."""
    from koopman_search.search.storage import layout
    from koopman_search.search.storage.database import Heartbeat
    from koopman_search.search.storage.layout import records_to_columns
    from koopman_search.search.storage.retry import retrying

    storage_s = 0.0
    with Heartbeat(storage, trial._trial_id):
        t = time.perf_counter()
        retrying(
            lambda: trial.set_user_attr("worker", {"host": "bench", "pid": os.getpid()}), "record the trial's worker"
        )
        storage_s += time.perf_counter() - t
        for epoch in range(1, epochs + 1):
            time.sleep(epoch_seconds)  # the stand-in trainer
            t = time.perf_counter()
            columns = records_to_columns(_records(epoch, epochs))
            artifact = f"{trial.number}-{epoch}"

            def record(epoch: int = epoch, columns: Any = columns, artifact: str = artifact) -> None:
                layout.set_trial_attr(trial, layout.RECORDS, columns)
                trial.set_user_attr("train_seconds", 96.0 * epoch)
                layout.set_trial_attr(trial, layout.CHECKPOINT, {"epoch": epoch, "artifact_id": artifact})
                trial.set_user_attr("epochs_run", epoch)
                storage.set_trial_system_attr(
                    trial._trial_id, f"artifacts:{artifact}", json.dumps({"artifact_id": artifact})
                )

            retrying(record, "record an epoch")
            storage_s += time.perf_counter() - t
        t = time.perf_counter()
        retrying(lambda: study.tell(trial, values, skip_if_finished=True), f"finish trial {trial.number}")
        storage_s += time.perf_counter() - t
    return storage_s


def worker_main(url: str, epochs: int, epoch_seconds: float) -> int:
    """Run as ``bench_scale_out.py --worker URL``: prints ``ready``, waits for a line on stdin, then
    claims and runs stand-in trials until the queue is empty; prints one JSON summary line."""
    import optuna
    from optuna.trial import TrialState

    from koopman_search.search.engine.study import claim_waiting_trial, load_study
    from koopman_search.search.storage.database import fail_stale_trials, open_storage
    from koopman_search.search.storage.retry import retrying

    counter = _RetryCounter()
    logging.getLogger("koopman_search.search").addHandler(counter)
    logging.getLogger("koopman_search.search").setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url)
    study = load_study(storage, NAME)
    values = [1.0 + 0.1 * i for i in range(len(study.directions))]
    print("ready", flush=True)
    sys.stdin.readline()
    trials: list[dict[str, Any]] = []
    failures: list[str] = []
    idle_s = 0.0
    while True:
        t0 = time.perf_counter()
        fail_stale_trials(study)
        trial = claim_waiting_trial(study)
        claim_s = time.perf_counter() - t0
        if trial is None:
            running = retrying(
                lambda: study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), "read running trials"
            )
            if not running:
                break
            time.sleep(0.5)
            idle_s += 0.5
            continue
        claimed_at = time.time()
        try:
            storage_s = claim_s + _run_trial(study, storage, trial, epochs, epoch_seconds, values)
        except Exception as exc:  # a storage error that retrying gave up on, or any other
            failures.append(f"trial {trial.number}: {type(exc).__name__}: {exc}"[:300])
            continue
        trials.append(
            {
                "number": trial.number,
                "claim_s": claim_s,
                "storage_s": storage_s,
                "claimed_at": claimed_at,
                "finished_at": time.time(),
            }
        )
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "trials": trials,
                "failures": failures,
                "retried": counter.count,
                "retried_messages": counter.messages,
                "idle_s": idle_s,
            }
        ),
        flush=True,
    )
    return 0


# ---- one run -----------------------------------------------------------------------------------------


def _database_connections(server_url: str, database: str, stop: threading.Event, seen: list[int]) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(server_url, poolclass=sa.pool.NullPool)
    query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :db")
    try:
        while not stop.wait(0.25):
            with engine.connect() as conn:
                seen.append(int(conn.execute(query, {"db": database}).scalar_one()))
    finally:
        engine.dispose()


def _start_proxy(url: str, threads: int, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [KOOPMAN_SEARCH, "-q", "storage-proxy", "--storage", url, "--port", "0", "--threads", str(threads)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on grpc://"):
        proc.kill()
        raise RuntimeError(f"storage-proxy did not start: {line!r}")
    return proc, line.split()[-1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_one(args: argparse.Namespace, workers: int, storage_kind: str) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState
    from sqlalchemy.engine import make_url

    from koopman_search.search.engine.study import create_or_load_study, ensure_budget
    from koopman_search.search.storage.database import open_storage
    from koopman_search.search.studyfile.spec import spec_from_dict

    budget = workers * args.trials_per_worker
    env = {
        **os.environ,
        "KOOPMAN_HEARTBEAT_INTERVAL": str(args.heartbeat_interval),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    with (
        postgres_scratch_db(args.postgres, "bench_scale_out") as url,
        tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp,
    ):
        d = copy.deepcopy(study_file_dict())
        d["study"].update(name=NAME, storage=url, artifacts=str(Path(tmp) / "artifacts"), n_trials=budget)
        d.pop("enqueue", None)
        spec = spec_from_dict(d, origin="bench scale-out", base_dir=REPO / "studies")
        storage = open_storage(url, heartbeat=False)
        study, _ = create_or_load_study(spec, storage)
        ensure_budget(study, spec)
        storage.engine.dispose()
        proxy = None
        target = url
        if storage_kind == "proxy":
            proxy, target = _start_proxy(url, args.proxy_threads, env)
        logger.info("%d workers, %s: starting %d processes (%d trials)", workers, storage_kind, workers, budget)
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            target,
            "--epochs",
            str(args.epochs),
            "--epoch-seconds",
            str(args.epoch_seconds),
        ]
        procs = [
            subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            for _ in range(workers)
        ]
        started_up = 0
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() == "ready":
                started_up += 1
        stop = threading.Event()
        connections: list[int] = []
        sampler = threading.Thread(
            target=_database_connections, args=(args.postgres, make_url(url).database, stop, connections), daemon=True
        )
        sampler.start()
        time.sleep(0.5)
        before = list(connections)
        began = time.time()
        for p in procs:
            assert p.stdin is not None
            try:
                p.stdin.write("go\n")
                p.stdin.flush()
            except OSError:
                pass
        outputs = [p.communicate(timeout=args.timeout) for p in procs]
        ended = time.time()
        stop.set()
        sampler.join(timeout=5)
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=30)
        summaries, crashed = [], []
        for p, (out, err) in zip(procs, outputs, strict=True):
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if p.returncode != 0 or not lines:
                crashed.append(err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}")
                continue
            summaries.append(json.loads(lines[-1]))
        frozen = optuna.load_study(storage=url, study_name=NAME).get_trials(deepcopy=False)
    done = [t for s in summaries for t in s["trials"]]
    claims: dict[int, int] = {}
    for t in done:
        claims[t["number"]] = claims.get(t["number"], 0) + 1
    budget_numbers = {t.number for t in frozen if "failed_trial" not in t.system_attrs}
    complete = {t.number for t in frozen if t.state == TrialState.COMPLETE}
    duplicates = sum(n - 1 for n in claims.values() if n > 1)
    lost = len(budget_numbers - complete)
    errors = sum(s["retried"] + len(s["failures"]) for s in summaries) + len(crashed)
    storage_s = [t["storage_s"] for t in done]
    claim_s = [t["claim_s"] for t in done]
    first = min((t["claimed_at"] for t in done), default=began)
    last = max((t["finished_at"] for t in done), default=ended)
    mean_storage = statistics.fmean(storage_s) if storage_s else math.nan
    row = {
        "workers": workers,
        "storage": "postgresql" if storage_kind == "direct" else "proxy",
        "trials": budget,
        "finished": len(complete),
        "throughput_trials_per_s": round(len(done) / max(last - first, 1e-9), 3),
        "ideal_trials_per_s": round(workers / (args.epochs * args.epoch_seconds), 3),
        "claim_p50_s": round(_percentile(claim_s, 0.5), 4),
        "claim_p95_s": round(_percentile(claim_s, 0.95), 4),
        "claim_max_s": round(max(claim_s, default=math.nan), 4),
        "storage_s_per_trial_mean": round(mean_storage, 4),
        "storage_s_per_trial_p95": round(_percentile(storage_s, 0.95), 4),
        "overhead_share": round(mean_storage / TRIAL_SECONDS_REAL, 6),
        "db_connections_max": max(connections, default=0),
        "db_connections_idle_before": max(before, default=0),
        "errors": errors,
        "lost": lost,
        "duplicates": duplicates,
        "workers_started": started_up,
        "wall_s": round(ended - began, 1),
    }
    messages = [m for s in summaries for m in s["failures"] + s["retried_messages"]] + crashed
    if messages:
        row["error_examples"] = messages[:5]
    logger.info("%s", json.dumps(row))
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument("--workers", default="16,32,64", help="worker processes per run (default: %(default)s)")
    p.add_argument("--storages", default="direct,proxy", help="direct, proxy or both (default: %(default)s)")
    p.add_argument("--trials-per-worker", type=int, default=3, help="budget = workers x this (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per stand-in trial (default: %(default)s)")
    p.add_argument("--epoch-seconds", type=float, default=1.0, help="sleep per stand-in epoch (default: %(default)s)")
    p.add_argument(
        "--heartbeat-interval",
        type=int,
        default=5,
        help="KOOPMAN_HEARTBEAT_INTERVAL of workers and proxy (default: %(default)s; the product's is 30)",
    )
    p.add_argument("--proxy-threads", type=int, default=16, help="storage-proxy --threads (default: %(default)s)")
    p.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES,
        help="a PostgreSQL server URL; a scratch database is made there per run (default: %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="the JSON results (default: bench/results/scale_out.json)")
    p.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.epochs, args.epoch_seconds)
    setup_logging()
    rows = []
    started = time.time()
    for storage_kind in args.storages.split(","):
        for workers in (int(n) for n in args.workers.split(",")):
            rows.append(run_one(args, workers, storage_kind))
    settings = {
        "trials_per_worker": args.trials_per_worker,
        "epochs": args.epochs,
        "epoch_seconds": args.epoch_seconds,
        "heartbeat_interval_s": args.heartbeat_interval,
        "proxy_threads": args.proxy_threads,
        "real_trial_s": TRIAL_SECONDS_REAL,
    }
    result = {"machine": machine_line(), "settings": settings, "rows": rows, "total_s": round(time.time() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"Measured: {result['machine']}")
    print(
        f"Stand-in trials: {args.epochs} epochs of {args.epoch_seconds} s sleep, {args.trials_per_worker} per "
        f"worker; heartbeat every {args.heartbeat_interval} s; proxy with {args.proxy_threads} threads; "
        f"overhead share = storage seconds per trial / {TRIAL_SECONDS_REAL:.0f} s. Written to {args.out}."
    )
    print()
    headers = [
        "workers",
        "storage",
        "trials/s (ideal)",
        "claim p50 / p95 / max s",
        "storage s per trial (p95)",
        "share of 960 s",
        "DB connections max",
        "errors",
        "lost",
        "duplicates",
    ]
    table = [
        [
            r["workers"],
            r["storage"],
            f"{r['throughput_trials_per_s']:.2f} ({r['ideal_trials_per_s']:.2f})",
            f"{r['claim_p50_s']:.3f} / {r['claim_p95_s']:.3f} / {r['claim_max_s']:.3f}",
            f"{r['storage_s_per_trial_mean']:.3f} ({r['storage_s_per_trial_p95']:.3f})",
            f"{100 * r['overhead_share']:.4f}%",
            r["db_connections_max"],
            r["errors"],
            r["lost"],
            r["duplicates"],
        ]
        for r in rows
    ]
    print(markdown_table(headers, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
