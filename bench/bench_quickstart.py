"""How long the README's quick start takes in a fresh clone: ``bash scripts/setup.sh`` and then
``.venv/bin/koopman-search launch studies/quickstart.toml``, each timed (wall and CPU), with the machine's
load stated.

    python bench/bench_quickstart.py            # clones this checkout's HEAD into a temp dir

Prints one markdown table on stdout (paste it with the command into BENCHMARKS.md); the two commands'
own output goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line, markdown_table


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], cwd: Path) -> tuple[float, float, int]:
    """(wall s, CPU s of the command and its children, exit code)"""
    cpu0, t0 = _cpu_children(), time.perf_counter()
    code = subprocess.run(command, cwd=cwd, stdout=sys.stderr, stderr=sys.stderr, check=False).returncode
    return time.perf_counter() - t0, _cpu_children() - cpu0, code


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="keep the clone (its path goes to stderr)")
    args = p.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    tmp = Path(tempfile.mkdtemp(prefix="koopman-quickstart-"))
    clone = tmp / "koopman-search"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env_load = os.getloadavg()
    rows = []
    for title, command in (
        ("bash scripts/setup.sh", ["bash", "scripts/setup.sh"]),
        (
            "koopman-search launch studies/quickstart.toml",
            [".venv/bin/koopman-search", "launch", "studies/quickstart.toml"],
        ),
    ):
        load = os.getloadavg()[0]
        wall, cpu, code = timed(command, clone)
        rows.append([title, f"{wall / 60:.1f} min ({wall:.0f} s)", f"{cpu / 60:.1f} min", f"{load:.1f}", code])
        if code != 0:
            break
    print(
        f"`.venv/bin/python bench/bench_quickstart.py`, a fresh clone of {head.stdout.strip()}; "
        f"{machine_line()}; load average at the start {env_load[0]:.1f}\n"
    )
    print(markdown_table(["command", "wall time", "CPU time", "load average (1 min) at its start", "exit"], rows))
    if args.keep:
        print(f"clone kept at {clone}", file=sys.stderr)
    else:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
