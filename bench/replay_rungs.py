"""Pruning rules replayed on finished unpruned studies: what each rule would have spent and kept on the same
trials, and how well a rung's values predict the final ones.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_search_cost.py --variants plain --seeds 0,1,2,3,4 \
        --keep KEEP --json ""                 # plain's 40 trials per seed, every epoch recorded, kept in KEEP
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_search_cost.py --variants ks-tpe-rungs --seeds 0 \
        --keep KEEP-KS --json ""              # any study with the search's baseline: its curves are read
    .venv/bin/python bench/replay_rungs.py --plain KEEP --baseline KEEP-KS/cost-ks-tpe-rungs-0.db
    .venv/bin/python bench/replay_rungs.py --plain studies/mine.db --correlation   # a study of your own

Any study run with ``pruner = "none"`` (every trial trained to its last epoch) can be read: ``--correlation``
needs nothing else (a study with ``baseline.val_ppl = "auto"`` holds its baseline); the replayed rules use
studies/wikitext2.toml's rules and the reference point below.

A plain study trains every trial to its last epoch and stores every epoch's record, so a pruning rule can be
replayed on it without training anything: the trials are taken in their order (one worker: every earlier
trial has finished when a trial reaches a rung), the study's rules (total loss over 7.0 from the first Koopman
epoch, val_ppl over 1.3 x the baseline's at the same epoch, a NaN loss) stop a trial first, then the rule's rungs decide
with the search's own decision (koopman_search.search.pruning.asha.decide, on the values asha ranks: ratios to
the baseline at the same epoch). A trial pays its Koopman epochs up to where it stopped (the shared warmup
gives it the first s); the baseline's epochs are added once per study. The hypervolume is that of the trials
that reach their last epoch, with bench_search_cost.py's reference point.

What this leaves out: the sampler. Plain's TPE chose the trials from their final values; a real search's
sampler sees only what the rule let through, so it proposes other trials. A replay ranks rules on the same
trials, as a tabular benchmark does; bench_search_cost.py measures the rule a search ships, with its sampler.

Rules (``--rules``, comma-separated): ``asha`` (the study file's: rungs after 1, 3, 9, ... Koopman epochs, the
top 1/3 continue, val_ppl and val_linear_nre divided by the baseline's at the same epoch), or ``asha`` with
modifiers joined by "+" (``asha+raw+union``), or ``rules`` (the study's rules alone, no rung: what the rules
themselves cost, the most any pruner can keep):

  rung2      the first rung after 2 Koopman epochs
  eta2/eta4  η = 2 or 4 instead of 3
  progress   the first rung at the first Koopman epoch whose scheduled weight is at least half the trial's
             koopman_weight_max (step: the first; linear with 8 Koopman epochs: the fourth), then η times further
  union      a trial also continues while it is in the top 1/η of the rung on any one objective
  raw        val_linear_nre compared as it is at the rung, not divided by the baseline's value at the same epoch
             (a one-seed curve, here measured on few validation batches)
  smooth     val_linear_nre divided by the baseline's curve averaged over three epochs (e − 1, e, e + 1)
  median     val_linear_nre divided by the median of the baseline's values at epochs e − 1, e, e + 1
  ppl        ranked on val_ppl alone (the objective whose early values predict its end better)
  random     the same rungs and the same number kept, but who continues is drawn at random (each trial at a
             rung continues with probability keep / n), averaged over 50 draws: what the ranking adds
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import doc_parser, hypervolume_2d, pareto_front

OBJECTIVES = ("val_ppl", "val_linear_nre")
TOTAL_LOSS_MAX, VAL_PPL_RATIO_MAX = 7.0, 1.3  # studies/wikitext2.toml's [rules]
REF = 1.3  # bench_search_cost.py's reference point: 1.3 x the baseline's final value of each objective
ETA = 3
MODIFIERS = ("rung2", "eta2", "eta4", "progress", "union", "raw", "smooth", "median", "random", "ppl")
DRAWS = 50  # replays of a "random" rule per study


@dataclass
class Trial:
    number: int
    start: int  # koopman_start_epoch
    params: dict[str, Any]
    columns: dict[str, list[Any]]  # the stored record columns, one entry per epoch 1..E

    def at(self, metric: str, epoch: int) -> float:
        value = self.columns[metric][self.columns["epoch"].index(epoch)]
        return math.nan if value is None else float(value)


@dataclass
class Baseline:
    val_ppl: list[float]
    curves: dict[str, list[float]]  # val_linear_nre
    epochs: int


def _start_of(params: dict[str, Any], columns: dict[str, list[Any]]) -> int:
    """The trial's koopman_start_epoch: its parameter, else the epoch before its first with a Koopman weight."""
    if "koopman_start_epoch" in params:
        return int(params["koopman_start_epoch"])
    weighted = [e for e, w in zip(columns["epoch"], columns["koopman_weight"], strict=True) if w]
    return (weighted[0] - 1) if weighted else columns["epoch"][-1]


def _studies(db: Path) -> Iterator[Any]:
    """Every study in the SQLite database ``db``."""
    import optuna

    url = f"sqlite:///{db}"
    for summary in optuna.get_all_study_summaries(url, include_best_trial=False):
        yield optuna.load_study(study_name=summary.study_name, storage=url)


def load_trials(db: Path) -> dict[str, list[Trial]]:
    """The complete trials of each search in the SQLite database ``db`` (baseline companions left out), by
    study name. A search with a pruned trial cannot be replayed (the trial's later epochs were never trained);
    failed, running and waiting trials are left out."""
    from koopman_search.search.storage import layout

    out = {}
    for study in _studies(db):
        if str(study.user_attrs.get(layout.ROLE_ATTR, "")).startswith(layout.BASELINE_ROLE_PREFIX):
            continue
        trials = []
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            if t.state.name == "PRUNED":
                raise SystemExit(f"{db}: study {study.study_name}: trial {t.number} was pruned; replay a study run "
                                 'with pruner = "none"')  # fmt: skip
            columns = layout.trial_attrs(t).get(layout.RECORDS)
            if t.state.name == "COMPLETE" and columns:
                trials.append(Trial(t.number, _start_of(t.params, columns), dict(t.params), columns))
        out[study.study_name] = trials
    return out


def load_baseline(db: Path) -> Baseline:
    from koopman_search.search.storage import layout

    for study in _studies(db):
        for key, value in layout.study_attrs(study).items():
            complete = isinstance(value, dict) and value.get("state") == "complete"
            if layout.baseline_key_seed(key) is not None and complete:
                records = value["records"]
                return Baseline(
                    [float(v) for v in records["val_ppl"]],
                    {"val_linear_nre": [float(v) for v in records["val_linear_nre"]]},
                    len(records["epoch"]),
                )
    raise SystemExit(f"{db}: no complete baseline in its studies (--baseline DB names one that has)")


# ---- the rules -----------------------------------------------------------------------------------------------


def geometric(first: int, eta: int, koopman_epochs: int) -> list[int]:
    """Rungs after first, first·η, first·η², ... Koopman epochs, before the last: the search's own."""
    from koopman_search.search.studyfile.prune_settings import AshaSettings

    return AshaSettings(reduction_factor=eta, min_epochs=first).rungs(koopman_epochs)


def progress_rungs(trial: Trial, koopman_epochs: int, epochs: int) -> list[int]:
    """The first Koopman epoch whose scheduled weight is at least half of w_max, then η times further."""
    from koopman_search.trainer.config import KoopmanConfig
    from koopman_search.trainer.schedule import koopman_weight

    cfg = KoopmanConfig(
        weight_max=float(trial.params["koopman_weight_max"]),
        start_epoch=trial.start,
        schedule=str(trial.params["schedule"]),
    )
    first = next(
        (k for k in range(1, koopman_epochs + 1) if koopman_weight(trial.start + k, cfg, epochs) >= cfg.weight_max / 2),
        koopman_epochs,
    )
    return geometric(first, ETA, koopman_epochs)


def eta_of(mods: set[str]) -> int:
    return 2 if "eta2" in mods else 4 if "eta4" in mods else ETA


def rung_epochs(mods: set[str], trial: Trial, koopman_epochs: int, epochs: int) -> list[int]:
    """The Koopman epochs at which a rule with modifiers ``mods`` judges ``trial``."""
    if "progress" in mods:
        return progress_rungs(trial, koopman_epochs, epochs)
    return geometric(2 if "rung2" in mods else 1, eta_of(mods), koopman_epochs)


def nre_curve(mods: set[str], base: Baseline) -> dict[str, list[float]]:
    """What val_linear_nre is divided by at a rung: the baseline's curve, smoothed, or nothing."""
    if "raw" in mods:
        return {}
    curve = base.curves["val_linear_nre"]
    if "smooth" in mods:
        windows = [curve[max(1, i - 1) : i + 2] for i in range(len(curve))]  # epoch 1 (untrained) left out
        curve = [curve[0]] + [statistics.mean(w) for w in windows[1:]]
    if "median" in mods:
        curve = [statistics.median(curve[max(0, i - 1) : i + 2]) for i in range(len(curve))]
    return {"val_linear_nre": curve}


def rung_point(trial: Trial, k: int, base: Baseline, curves: dict[str, list[float]]) -> tuple[float, ...]:
    from koopman_search.search.pruning.asha import rung_values

    values = rung_values(trial.columns, trial.start + k, OBJECTIVES, (1.0, 1.0), base.val_ppl, curves)
    assert values is not None
    return values


def replay(
    trials: Sequence[Trial], base: Baseline, rule: str, rng: random.Random | None = None
) -> tuple[int, list[tuple[float, float]], list[str]]:
    """(Koopman epochs paid, finals of the trials that completed, one line per trial that stopped early);
    ``rng`` draws who continues under a "random" rule."""
    from koopman_search.search.pruning.asha import decide

    epochs = base.epochs
    mods = set(rule.split("+")[1:])
    curves, eta = nre_curve(mods, base), eta_of(mods)
    reached: list[tuple[Trial, int]] = []  # (trial, the last Koopman epoch it has a record at)
    seen: dict[tuple[int, int], tuple[float, ...]] = {}  # (trial number, k) -> its rung values, read once

    def point(t: Trial, k: int) -> tuple[float, ...]:
        if (t.number, k) not in seen:
            seen[t.number, k] = rung_point(t, k, base, curves)
        return seen[t.number, k]

    paid, finals, stops = 0, [], []
    for trial in trials:
        n_k = epochs - trial.start
        rungs = [] if rule == "rules" else rung_epochs(mods, trial, n_k, epochs)
        stop, why = n_k, ""
        for k in range(1, n_k + 1):
            epoch = trial.start + k
            if any(math.isnan(trial.at(m, epoch)) for m in ("total_loss", "val_ppl")):
                stop, why = k, "non-finite"
                break
            if trial.at("total_loss", epoch) > TOTAL_LOSS_MAX:
                stop, why = k, f"total_loss {trial.at('total_loss', epoch):.2f}"
                break
            if trial.at("val_ppl", epoch) / base.val_ppl[epoch - 1] > VAL_PPL_RATIO_MAX:
                stop, why = k, "val_ppl ratio"
                break
            if k not in rungs:
                continue
            mine = point(trial, k)
            others = [point(o, k) for o, last in reached if last >= k]
            if "ppl" in mods:  # ranked on val_ppl alone
                mine, others = mine[:1], [o[:1] for o in others]
            d = decide(mine, others, eta)
            kept = rng.random() < d.keep / d.of if rng is not None and "random" in mods else d.kept
            if not kept and "union" in mods:
                kept = any(sum(1 for o in others if o[m] < mine[m]) < d.keep for m in range(len(mine)))
            if not kept:
                stop, why = k, f"rung at Koopman epoch {k}: rank {d.rank} of {d.of}, keeps {d.keep}"
                break
        paid += stop
        reached.append((trial, stop))
        if stop == n_k and not why:
            finals.append((trial.at("val_ppl", epochs), trial.at("val_linear_nre", epochs)))
        else:
            stops.append(f"trial {trial.number} stopped after Koopman epoch {stop} of {n_k}: {why}")
    return paid, finals, stops


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank); NaN under three pairs."""

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for m in order[i : j + 1]:
                out[m] = (i + j) / 2
            i = j + 1
        return out

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    try:
        return statistics.correlation(ranks([x for x, _ in pairs]), ranks([y for _, y in pairs]))
    except statistics.StatisticsError:  # one of them constant
        return math.nan


def correlation_text(studies: dict[str, list[Trial]], base: Baseline, rungs: Sequence[int]) -> str:
    """Per study, the rank correlation between a trial's values at each rung (as asha ranks them) and its final
    values, per objective: what successive halving rests on (1: the rung orders trials as their ends will).
    The last pair of columns reads the values one epoch before the end (every trial at the same epoch): how
    well the final value is predicted at all, its own noise included."""
    curves, last = nre_curve(set(), base), base.epochs

    def probe(k: int | None) -> Callable[[Trial], tuple[float, ...] | None]:
        if k is None:  # the epoch before the last, as it is
            return lambda t: tuple(t.at(m, last - 1) for m in OBJECTIVES) if t.start < last - 1 else None
        return lambda t: rung_point(t, k, base, curves) if t.start + k <= last else None

    probes = [(f"Koopman epoch {k}", probe(k)) for k in rungs] + [(f"epoch {last - 1}", probe(None))]
    head = [f"{m} at {label}" for label, _ in probes for m in OBJECTIVES]
    lines = ["| study | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    columns: list[list[float]] = [[] for _ in head]
    for name, trials in sorted(studies.items()):
        cells = []
        for _, values_of in probes:
            there = [(t, v) for t in trials if (v := values_of(t)) is not None]
            for m, metric in enumerate(OBJECTIVES):
                rho = spearman([v[m] for _, v in there], [t.at(metric, last) for t, _ in there])
                columns[len(cells)].append(rho)
                cells.append(f"{rho:+.2f} ({len(there)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{statistics.mean(c):+.2f}" for c in columns) + " |")
    return "\n".join(lines)


def _params(trial: Trial) -> str:
    p = trial.params
    return (
        f"w_max {float(p['koopman_weight_max']):.3f}, start {trial.start}, {p['schedule']}, "
        f"threshold {float(p['fallback_threshold']):.2f}, dim {p['koopman_dim']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = doc_parser(__doc__)
    p.add_argument(
        "--plain",
        required=True,
        nargs="+",
        metavar="PATH",
        help="SQLite databases of studies run with no pruner, or folders of them (bench_search_cost.py --keep DIR "
        "of plain runs)",
    )
    p.add_argument(
        "--baseline",
        metavar="DB",
        help="a study database holding a complete baseline (default: the first --plain database; plain runs of "
        "bench_search_cost.py have none)",
    )
    p.add_argument("--rules", default="rules,asha,asha+rung2,asha+eta4,asha+progress,asha+union,asha+raw,asha+smooth")
    p.add_argument("--explain", default="", help="a rule whose stops of plain's front trials are listed")
    p.add_argument(
        "--correlation",
        action="store_true",
        help="print the rank correlation between the values at Koopman epochs 1 and 3 and the final values "
        "instead of replaying rules",
    )
    args = p.parse_args(argv)
    for rule in args.rules.split(","):
        head, *mods = rule.split("+")
        if rule != "rules" and (head != "asha" or any(m not in MODIFIERS for m in mods)):
            p.error(f"--rules: each is asha with modifiers among {', '.join(MODIFIERS)} joined by +, but got {rule!r}")
    dbs = [db for path in map(Path, args.plain) for db in (sorted(path.glob("*.db")) if path.is_dir() else [path])]
    missing = [db for db in dbs if not db.is_file()]
    if missing or not dbs:
        raise SystemExit(f"--plain: no SQLite database at {missing[0] if missing else args.plain[0]}")
    base = load_baseline(Path(args.baseline) if args.baseline else dbs[0])
    ref = (REF * base.val_ppl[-1], REF * base.curves["val_linear_nre"][-1])
    studies = {name: trials for db in dbs for name, trials in load_trials(db).items() if trials}
    print(f"baseline final val_ppl {base.val_ppl[-1]:.1f}, val_linear_nre {base.curves['val_linear_nre'][-1]:.4g}")
    print("baseline val_linear_nre by epoch: " + ", ".join(f"{v:.3g}" for v in base.curves["val_linear_nre"]))
    if args.correlation:
        print("Spearman's rank correlation, a rung's values against the final ones (trials reaching the rung):")
        print(correlation_text(studies, base, (1, 3)))
        return 0
    print(f"studies {', '.join(sorted(studies))}; epochs and hypervolume as fractions of the unpruned study's")
    finals = {name: [(t.at("val_ppl", base.epochs), t.at("val_linear_nre", base.epochs)) for t in trials]
              for name, trials in studies.items()}  # fmt: skip
    print(
        "the unpruned studies' hypervolume: "
        + ", ".join(f"{s}: {hypervolume_2d(f, ref):.5g}" for s, f in sorted(finals.items()))
    )
    print("| rule | epochs vs plain (mean, min..max) | HV vs plain (mean, min..max) | per study (epochs / HV) |")
    print("|---|---|---|---|")
    for rule in args.rules.split(","):
        ep, hv, cells = [], [], []
        for name, trials in sorted(studies.items()):
            plain_epochs = base.epochs * len(trials)
            plain_hv = hypervolume_2d(finals[name], ref)
            draws = [random.Random(d) for d in range(DRAWS)] if "random" in rule.split("+") else [None]
            runs = [replay(trials, base, rule, rng) for rng in draws]
            ep.append(statistics.mean((paid + base.epochs) / plain_epochs for paid, _, _ in runs))
            hv.append(statistics.mean(hypervolume_2d(kept, ref) / plain_hv for _, kept, _ in runs))
            stops = runs[0][2]
            cells.append(f"{ep[-1]:.1%} / {hv[-1]:.1%}")
            if rule == args.explain:
                front = set(
                    pareto_front([(t.at("val_ppl", base.epochs), t.at("val_linear_nre", base.epochs)) for t in trials])
                )
                for t, line in ((t, s) for t in trials for s in stops if s.startswith(f"trial {t.number} ")):
                    if (t.at("val_ppl", base.epochs), t.at("val_linear_nre", base.epochs)) in front:
                        print(f"  {name}: front trial ({_params(t)}) {line}", file=sys.stderr)
        print(
            f"| {rule} | {statistics.mean(ep):.1%} ({min(ep):.1%}..{max(ep):.1%}) | "
            f"{statistics.mean(hv):.1%} ({min(hv):.1%}..{max(hv):.1%}) | {', '.join(cells)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
