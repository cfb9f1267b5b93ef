"""The trade-off: what the Koopman weight buys in linearity, and what it costs in perplexity, against seed noise.

    .venv/bin/python bench/bench_tradeoff.py                       # 3 weights x 3 seeds (about 30 min, 1 thread)
    .venv/bin/python bench/bench_tradeoff.py --weights 0.01 0.5 --seeds 0 --steps 30   # a quick look

The user's setup on WikiText-2 (vocabulary 30000, d_model 64, 4 blocks, k 256, linear schedule from start epoch
3, 10 epochs, the decoder objective) reduced to ``--steps`` training steps per epoch of ``--batch`` × ``--seq``
tokens and ``--eval-batches`` validation batches. Per seed the Koopman-off baseline runs once and every weight
warm-starts from its checkpoint after the start epoch (shared warmup, docs/design.md), so all differences
between the weights of one seed come from the Koopman epochs. One run at a time, torch pinned to
``--threads`` threads.

Per run, at the last epoch: val_ppl ÷ the baseline's, and the candidate linearity measures: ``val_linear_nre``
and ``val_linear_ppl`` (fresh heads fitted in closed form on the frozen backbone, trainer/linearity.py),
``val_koopman_forward_ppl`` (the trial's own heads), φ's effective rank against the states' (``phi_rank_ratio``).
The baseline is reported as weight 0 (its closed-form measures need no heads).

For each candidate measure, ``snr`` = the standard deviation of the per-weight means (weights > 0) ÷ the pooled
within-weight standard deviation over seeds. The head-free measures are scored against the same seed's baseline
(``val_linear_nre_ratio`` = val_linear_nre ÷ the baseline's): inside a study every trial shares one trainer
seed and one baseline, so the seed's backbone level is not noise the study sees. val_linear_ppl moves with the
language model's own quality, so its linearity part is scored as ``val_linear_ppl_ratio`` = val_linear_ppl ÷
val_ppl (what replacing the blocks costs). Of these two, the one with the larger snr is written as
``measure`` (docs/koopman-objective.md, "The linearity measure"). Output: markdown tables on stdout and
``bench/results/tradeoff.json``. ``--rescore FILE`` scores an earlier output again without training.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from bench._common import WIKITEXT2, doc_parser, machine_line, markdown_table, reduced_user_setup, setup_logging  # noqa: E402
from koopman_search.trainer.config import TrainerConfig, with_overrides  # noqa: E402
from koopman_search.trainer.data import load_corpus  # noqa: E402
from koopman_search.trainer.loop import HybridKoopmanTrainer  # noqa: E402
from koopman_search.trainer.records import EpochRecord  # noqa: E402

# Measures that need no trained heads (fitted afresh at each evaluation): the candidates for the objective.
HEAD_FREE = ("val_linear_nre", "val_linear_ppl")
CANDIDATES = (*HEAD_FREE, "val_koopman_forward_ppl")
# The candidates for a linearity objective, in the form they are scored in, and the record field a study
# optimises. val_linear_nre against the same seed's baseline (weight 0): the seed's backbone level cancels, as
# it does inside a study (one trainer seed, one baseline). val_linear_ppl itself is left out: it moves with the
# language model's own quality (its snr is val_ppl's); the replacement's cost is val_linear_ppl ÷ val_ppl.
RELATIVE_OF = {"val_linear_nre_ratio": "val_linear_nre", "val_linear_ppl_ratio": "val_linear_ppl_ratio"}
RELATIVE = tuple(RELATIVE_OF)


def base_overrides(args: Any, seed: int) -> dict[str, Any]:
    return {
        **reduced_user_setup(args.data, args.seq, args.batch, args.epochs, args.start_epoch, args.steps),
        "koopman.schedule": "linear",
        "train.seed": seed,
        "train.max_eval_batches": args.eval_batches,
    }


def row(weight: float, seed: int, start: int, last: EpochRecord, base: EpochRecord, koop_s: float) -> dict[str, Any]:
    fallback = last.fallback_batches
    return {
        "weight_max": weight,
        "start_epoch": start,
        "seed": seed,
        "val_ppl": last.val_ppl,
        "val_ppl_ratio": last.val_ppl / base.val_ppl,
        "val_linear_nre": last.val_linear_nre,
        "val_linear_nre_blocks": last.val_linear_nre_blocks,
        "val_linear_ppl": last.val_linear_ppl,
        "val_linear_ppl_ratio": last.val_linear_ppl / last.val_ppl,
        "val_koopman_forward_ppl": last.val_koopman_forward_ppl,
        "phi_effective_rank": last.phi_effective_rank,
        "state_effective_rank": last.state_effective_rank,
        "phi_rank_ratio": last.phi_rank_ratio,
        "koopman_loss": last.koopman_loss,
        "total_loss": last.total_loss,
        "fallback_batches_last_epoch": fallback,
        "koopman_seconds": round(koop_s, 1),
    }


def snr(rows: list[dict[str, Any]], key: str) -> float:
    """std of the per-weight means ÷ pooled within-weight std over seeds (weights > 0)."""
    by_weight: dict[float, list[float]] = {}
    for r in rows:
        if r["weight_max"] > 0 and math.isfinite(r[key]):
            by_weight.setdefault(r["weight_max"], []).append(r[key])
    groups = [v for v in by_weight.values() if len(v) >= 2]
    if len(groups) < 2:
        return math.nan
    between = statistics.stdev([statistics.fmean(v) for v in groups])
    within = math.sqrt(statistics.fmean([statistics.variance(v) for v in groups]))
    return between / within if within > 0 else math.inf


def main() -> None:
    parser = doc_parser(__doc__ or "")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.01, 0.07, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60, help="training steps per epoch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--start-epoch", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default="files:" + os.path.relpath(WIKITEXT2))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tradeoff.json"))
    parser.add_argument("--rescore", metavar="JSON", help="score the runs of an earlier output again, no training")
    args = parser.parse_args()
    setup_logging()
    if args.rescore:
        earlier = json.loads(Path(args.rescore).read_text())
        report(
            earlier["rows"],
            earlier["baselines"],
            earlier["settings"],
            args.out,
            time.perf_counter(),
            earlier["machine"],
        )
        return
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    corpus = None
    rows: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    started = time.perf_counter()
    for seed in args.seeds:
        base_cfg = with_overrides(TrainerConfig(), {**base_overrides(args, seed), "koopman.enabled": False})
        if corpus is None:
            d = base_cfg.data
            corpus = load_corpus(d.source, d.vocab_size, d.cache_dir)
        with tempfile.TemporaryDirectory() as tmp:
            baseline = HybridKoopmanTrainer(base_cfg, corpus)
            records = baseline.fit(checkpoint_dir=tmp)
            base_last = records[-1]
            baselines.append(row(0.0, seed, args.start_epoch, base_last, base_last, 0.0))
            print(
                f"seed {seed} baseline: val_ppl {base_last.val_ppl:.1f}, val_linear_nre {base_last.val_linear_nre:.4f}",
                file=sys.stderr,
            )
            for weight in args.weights:
                cfg = with_overrides(TrainerConfig(), {**base_overrides(args, seed), "koopman.weight_max": weight})
                trainer = HybridKoopmanTrainer(cfg, corpus)
                trainer.warm_start_from(Path(tmp) / f"epoch_{args.start_epoch}.pt")
                t0 = time.perf_counter()
                last = trainer.fit()[-1]
                r = row(weight, seed, args.start_epoch, last, base_last, time.perf_counter() - t0)
                rows.append(r)
                print(
                    f"seed {seed} weight {weight}: ratio {r['val_ppl_ratio']:.4f}, val_linear_nre "
                    f"{r['val_linear_nre']:.4f}, val_linear_ppl/val_ppl {r['val_linear_ppl_ratio']:.4f}, "
                    f"forward {r['val_koopman_forward_ppl']:.1f} ({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "rescore")}
    report(rows, baselines, settings, args.out, started, f"{machine_line()}; {time.perf_counter() - started:.0f} s")


def report(
    rows: list[dict[str, Any]],
    baselines: list[dict[str, Any]],
    settings: dict[str, Any],
    out: str,
    started: float,
    machine: str,
) -> None:
    """Score the candidate measures, print the tables and write the JSON."""
    base_by_seed = {b["seed"]: b for b in baselines}
    for r in rows:  # each run against its own seed's baseline: the seed's backbone level cancels
        base = base_by_seed[r["seed"]]
        r["val_linear_nre_ratio"] = r["val_linear_nre"] / base["val_linear_nre"]
        r["val_linear_ppl_vs_baseline"] = r["val_linear_ppl"] / base["val_linear_ppl"]
    for b in baselines:
        b["val_linear_nre_ratio"] = b["val_linear_ppl_vs_baseline"] = 1.0
    keys = (*CANDIDATES, *RELATIVE, "val_linear_ppl_vs_baseline", "val_ppl_ratio", "phi_rank_ratio")
    snrs = {key: snr(rows, key) for key in keys}
    measure = max(RELATIVE, key=lambda k: snrs[k] if math.isfinite(snrs[k]) else -1.0)
    record = RELATIVE_OF[measure]
    result = {
        "measure": record,
        "snr": round(snrs[measure], 3),
        "snr_scored_on": measure,
        "snr_all": {k: round(v, 3) for k, v in snrs.items()},
        "settings": settings,
        "machine": machine,  # where and when the runs trained
        "rows": rows,
        "baselines": baselines,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    cols = (
        "weight_max",
        "seed",
        "val_ppl_ratio",
        "val_linear_nre",
        "val_linear_nre_ratio",
        "val_linear_ppl_ratio",
        "val_koopman_forward_ppl",
        "phi_rank_ratio",
        "state_effective_rank",
    )
    table = [[r[c] for c in cols] for r in baselines + rows]
    print(markdown_table(cols, table))
    means = []
    mean_keys = ("val_ppl_ratio", "val_linear_nre_ratio", "val_linear_ppl_vs_baseline", "phi_rank_ratio")
    for w in sorted({r["weight_max"] for r in baselines + rows}):
        group = [r for r in baselines + rows if r["weight_max"] == w]
        cells = [f"{w:g}"]
        for k in mean_keys:
            values = [r[k] for r in group]
            finite = all(math.isfinite(v) for v in values)
            cells.append(f"{statistics.fmean(values):.4g} ± {statistics.pstdev(values):.2g}" if finite else "-")
        means.append(cells)
    print()
    print(markdown_table(("weight_max", *mean_keys), means))
    print(f"\nsnr: {json.dumps(result['snr_all'])}")
    print(f"measure: {record} (scored as {measure}, snr {result['snr']}); wrote {os.path.relpath(out)}")
    print(f"trained on: {machine}")


if __name__ == "__main__":
    main()
