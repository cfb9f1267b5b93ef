"""A small study under repeated random faults: nothing finished may be lost (docs/design.md, "Fault model").

    sudo .venv/bin/python bench/chaos.py --trials 8 --workers 2 --faults 12

Runs `koopman-search worker --workers N` on a tiny study (the test suite's slow model: d_model 16, one
block, 8 steps of 8 x 16 tokens per epoch with a pause of 0.05 s per step) against a PostgreSQL cluster of
its own and an artifact store on a small tmpfs, and meanwhile, every 3 to 8 s, injects one fault drawn at
random: kill -9 of a worker process in a trial, a restart of the database (down 2 to 8 s), a full
artifact disk (2 to 6 s), the artifacts folder removed (its checkpoints with it), or the artifact disk
made read-only (2 to 6 s). Then it prints faults injected, trials finished, trials lost (goal 0), retries
and epochs re-trained. Needs root (tmpfs, and the cluster belongs to the postgres user) and the PostgreSQL
server binaries. Exit status 1 when a trial was lost.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from koopman_search.search.storage import layout  # noqa: E402
from tests.search.pg_cluster import own_cluster  # noqa: E402
from tests.search.study_files import write_worker_study  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)

FAULTS = ("kill -9 of a worker", "database restart", "disk full", "artifacts folder removed", "artifacts read-only")


def _trials(url: str) -> list[FrozenTrial] | None:
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"connect_timeout": 2}})
    except Exception:
        return None
    try:
        return optuna.load_study(study_name="w", storage=storage).get_trials(deepcopy=False)
    except Exception:
        return None
    finally:
        storage.engine.dispose()


def _kill_a_worker(url: str, rng: random.Random) -> bool:
    running = [t for t in (_trials(url) or []) if t.state == TrialState.RUNNING and "worker" in t.user_attrs]
    if not running:
        return False
    pid = int(rng.choice(running).user_attrs["worker"]["pid"])
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _fill(disk: Path) -> Path:
    """Fill the disk but 64 KiB (what is free changes while the workers write: a write that finds it full
    already has done the job)."""
    ballast = disk / "ballast"
    try:
        ballast.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - 64 * 1024))
    except OSError:
        pass
    return ballast


def _own_epochs(trial: FrozenTrial, parent: FrozenTrial | None) -> int:
    """Epochs an attempt trained and checkpointed itself (0 when its checkpoint is its parent's)."""
    pointer = layout.trial_attrs(trial).get(layout.CHECKPOINT) or {}
    if parent is not None and pointer.get("artifact_id") == (
        layout.trial_attrs(parent).get(layout.CHECKPOINT) or {}
    ).get("artifact_id"):
        return 0
    start = int(trial.user_attrs.get("epochs_resumed") or trial.user_attrs.get("epochs_from_warmup") or 0)
    return max(0, int(pointer.get("epoch", start)) - start)


def summarize(trials: list[FrozenTrial], epochs: int) -> dict[str, int]:
    by_number = {t.number: t for t in trials}
    originals = [t for t in trials if "failed_trial" not in t.system_attrs]
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    finished = lost = retrained = 0
    for first in originals:
        chain = [first] + [t for t in retries if t.system_attrs.get("retry_history", [None])[0] == first.number]
        done = [t for t in chain if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        if done:
            finished += 1
        else:
            lost += 1
        trained = sum(_own_epochs(t, by_number.get(t.system_attrs.get("failed_trial", -1))) for t in chain)
        needed = (layout.trial_attrs(done[0])[layout.RECORDS]["epoch"][-1] if done else 0) - int(
            first.user_attrs.get("epochs_from_warmup", 0)
        )
        retrained += max(0, trained - needed)
    return {
        "trials issued": len(originals),
        "trials finished": finished,
        "trials lost": lost,
        "retries": len(retries),
        "epochs checkpointed twice (re-trained)": retrained,
        "unfinished (RUNNING or WAITING)": sum(1 for t in trials if not t.state.is_finished()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--faults", type=int, default=12, help="faults to inject in all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the worker command may take")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ks-chaos-"))
    disk = Path(tempfile.mkdtemp(prefix="ks-chaos-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], check=True)
    env = {
        **os.environ,
        "KOOPMAN_HEARTBEAT_INTERVAL": "1",
        "PYTHONPATH": str(REPO),
        "KOOPMAN_TEST_STEP_SECONDS": "0.05",
        "KOOPMAN_OUTAGE_TIMEOUT": "60",
    }
    faults: Counter[str] = Counter()
    started = time.monotonic()
    try:
        with own_cluster() as pg:
            study = write_worker_study(work, pg.url, n_trials=args.trials, epochs=args.epochs, start_epoch=1, slow=True)
            study.write_text(
                study.read_text().replace(f'artifacts = "{work / "artifacts"}"', f'artifacts = "{disk / "artifacts"}"')
            )
            cli = [sys.executable, "-m", "koopman_search.search.cli"]
            subprocess.run([*cli, "create", str(study)], check=True, env=env, cwd=REPO, capture_output=True)
            with (work / "worker.err").open("wb") as err:
                worker = subprocess.Popen(
                    [*cli, "worker", str(study), "--workers", str(args.workers)],
                    env=env,
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            while worker.poll() is None and sum(faults.values()) < args.faults:
                time.sleep(rng.uniform(3.0, 8.0))
                if worker.poll() is not None:
                    break
                kind = rng.choice(FAULTS)
                if kind == "kill -9 of a worker":
                    if not _kill_a_worker(pg.url, rng):
                        continue
                elif kind == "database restart":
                    pg.stop()
                    time.sleep(rng.uniform(2.0, 8.0))
                    pg.start()
                elif kind == "disk full":
                    ballast = _fill(disk)
                    time.sleep(rng.uniform(2.0, 6.0))
                    ballast.unlink()
                elif kind == "artifacts folder removed":
                    shutil.rmtree(disk / "artifacts", ignore_errors=True)
                else:  # read-only: as root, a mode bit stops nothing; the mount does
                    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
                    time.sleep(rng.uniform(2.0, 6.0))
                    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
                faults[kind] += 1
            try:
                code = worker.wait(timeout=max(1.0, args.timeout - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                worker.kill()
                code = worker.wait()
            trials = _trials(pg.url) or []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        shutil.rmtree(disk, ignore_errors=True)
    result = summarize(trials, args.epochs)
    print(
        f"chaos: {args.trials} trials x {args.epochs} epochs, {args.workers} worker processes, seed {args.seed}, "
        f"{time.monotonic() - started:.0f} s, worker exit status {code}"
    )
    print("| what | count |")
    print("|---|---|")
    for kind in FAULTS:
        print(f"| faults injected: {kind} | {faults[kind]} |")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    print(f"(worker log: {work / 'worker.err'})")
    return 1 if result["trials lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
