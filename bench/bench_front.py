"""The shipped study's Pareto front at reduced steps: does it hold several Koopman weights?

    .venv/bin/python bench/bench_front.py                     # 40 trials (about 15 min on 2 cores, 1 thread)

studies/wikitext2.toml (its search space, objectives, rules, pruner, sampler and enqueued trials) run through
the real command line (``koopman-search launch``, then ``status -f json``) on a fresh SQLite study, reduced so
that it fits a CPU: ``--steps`` training steps of ``--batch`` × ``--seq`` tokens per epoch, ``--eval-batches``
validation batches, ``--epochs`` epochs with start epochs 2..``--epochs`` − 2, one torch thread. Prints the
front (trial, weight, the objectives), the number of distinct weights on it, and the rules' reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from bench._common import WIKITEXT2, doc_parser, machine_line, markdown_table  # noqa: E402


def study_text(args: object, folder: Path) -> str:
    source = (REPO / "studies" / "wikitext2.toml").read_text(encoding="utf-8")
    a = vars(args)
    reduced = source.replace('name = "wikitext2-koopman"', 'name = "front"')
    reduced = reduced.replace("n_trials = 40 ", f"n_trials = {a['trials']} ")
    reduced = reduced.replace('source = "files:../../shared/data/wikitext-2"', f'source = "files:{WIKITEXT2}"')
    reduced = reduced.replace("seq_len = 128", f"seq_len = {a['seq']}")
    reduced = reduced.replace("batch_size = 32", f"batch_size = {a['batch']}")
    reduced = reduced.replace("epochs = 10\n", f"epochs = {a['epochs']}\n")
    limits = f'device = "cpu"\nmax_steps_per_epoch = {a["steps"]}\nmax_eval_batches = {a["eval_batches"]}'
    reduced = reduced.replace('device = "auto"', limits)
    reduced = reduced.replace("low = 2\nhigh = 7", f"low = 2\nhigh = {a['epochs'] - 2}")
    for start in range(a["epochs"] - 1, 8):  # enqueued start epochs beyond the reduced range
        reduced = reduced.replace(f"koopman_start_epoch = {start}\n", f"koopman_start_epoch = {a['epochs'] - 2}\n")
    if reduced == source:
        raise SystemExit("bench_front: studies/wikitext2.toml changed shape; update this script")
    path = folder / "front.toml"
    path.write_text(reduced, encoding="utf-8")
    return str(path)


def main() -> None:
    parser = doc_parser(__doc__ or "")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--keep", help="a folder to keep the study in (default: a temporary one)")
    args = parser.parse_args()
    started = time.perf_counter()
    exe = str(Path(sys.executable).parent / "koopman-search")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        study = study_text(args, folder)
        subprocess.run([exe, "launch", study], check=True, env=env, stdout=subprocess.DEVNULL)
        out = subprocess.run([exe, "status", study, "-f", "json"], check=True, env=env, capture_output=True, text=True)
        best = subprocess.run([exe, "best", study, "-f", "json"], check=True, env=env, capture_output=True, text=True)
    data, front = json.loads(out.stdout), json.loads(best.stdout)
    trials = front.get("pareto_front") or [front.get("best") or front["chosen"]]
    names = data["objectives"]
    rows = [[t["number"], t["params"].get("koopman_weight_max"), *[t["values"].get(n) for n in names]] for t in trials]
    print(markdown_table(("trial", "koopman_weight_max", *names), rows))
    weights = {round(r[1], 6) for r in rows if r[1] is not None}
    print(f"\nfront: {len(rows)} trials, {len(weights)} distinct Koopman weights")
    for rule in data.get("rules", {}).values():
        print(f"rule {rule['text']}")
    if data.get("tradeoff"):
        print(f"trade-off: {data['tradeoff']}")
    print(data["summary"])
    print(f"{machine_line()}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
