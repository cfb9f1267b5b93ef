"""Threads per slot: trials per hour of the quick-start study with ``launch --workers 1`` and ``--workers 2``
(each slot's threads by default: the cores divided among the slots) and with ``--threads`` set, every run a
fresh copy of studies/quickstart.toml in its own folder, run as a user runs it (``python -m
koopman_search.search.cli launch``), the variants interleaved round by round.

    .venv/bin/python bench/bench_threads.py                       # 2 rounds of 3 variants, about 8 minutes
    .venv/bin/python bench/bench_threads.py --rounds 1 --trials 4

Trials per hour count the trial phase only (from the first trial's start to the last trial's end, as Optuna
stored them): the baseline runs once per study in every variant alike. Prints one markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line, markdown_table

VARIANTS = {
    "--workers 1 (default threads)": ["--workers", "1"],
    "--workers 1 --threads 1": ["--workers", "1", "--threads", "1"],
    "--workers 2 (default threads)": ["--workers", "2"],
}


def run_once(args: list[str], trials: int, folder: Path) -> tuple[float, int, list[int]]:
    """(trials per hour of the trial phase, trials finished, torch threads recorded per trial)."""
    text = (REPO / "studies" / "quickstart.toml").read_text(encoding="utf-8")
    study = folder / "quickstart.toml"
    study.write_text(text.replace("n_trials = 8 ", f"n_trials = {trials} "), encoding="utf-8")
    assert tomllib.loads(study.read_text())["study"]["n_trials"] == trials
    command = [sys.executable, "-m", "koopman_search.search.cli", "-q", "launch", str(study), *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=sys.stderr, env=None)
    loaded = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{folder / 'quickstart.db'}")
    done = [t for t in loaded.get_trials(deepcopy=False) if t.datetime_complete and t.state.is_finished()]
    start = min(t.datetime_start for t in done if t.datetime_start)
    end = max(t.datetime_complete for t in done if t.datetime_complete)
    hours = (end - start).total_seconds() / 3600
    threads = [int(t.user_attrs.get("worker", {}).get("torch_threads", 0)) for t in done]
    return len(done) / hours, len(done), threads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="rounds of every variant (default 2)")
    p.add_argument("--trials", type=int, default=8, help="trials per study (default 8, the quick start's)")
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    threads: dict[str, set[int]] = {name: set() for name in VARIANTS}
    for r in range(args.rounds):
        names = list(VARIANTS)
        names = names[r % len(names) :] + names[: r % len(names)]  # each round starts with another variant
        for name in names:
            with tempfile.TemporaryDirectory(prefix="bench-threads-") as folder:
                rate, n, recorded = run_once(VARIANTS[name], args.trials, Path(folder))
            results[name].append(rate)
            threads[name].update(recorded)
            print(
                f"round {r}: {name}: {n} trials, {rate:.0f} trials/h, threads {sorted(set(recorded))}", file=sys.stderr
            )
    base = statistics.median(results["--workers 1 (default threads)"])
    rows = [
        (
            name,
            ", ".join(map(str, sorted(threads[name]))),
            f"{statistics.median(rates):.0f}",
            f"{min(rates):.0f}–{max(rates):.0f}",
            f"**{statistics.median(rates) / base:.2f}**",
        )
        for name, rates in results.items()
    ]
    print("## Threads per slot\n")
    print(f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(machine_line() + "\n")
    print(
        f"The quick-start study ({args.trials} trials, builtin corpus, on CPU), {args.rounds} round(s) of each "
        "variant, each run a fresh study; trials per hour over the trial phase.\n"
    )
    print(
        markdown_table(
            ("launch", "torch threads per trial", "trials/h (median)", "min–max", "÷ --workers 1 default"), rows
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
