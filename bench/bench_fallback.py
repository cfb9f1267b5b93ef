"""The fallback per threshold: how many batches each ``fallback_threshold`` cuts, under the default objective.

    .venv/bin/python bench/bench_fallback.py               # the user's setup at reduced steps (about 6 min)

The user's setup on WikiText-2 (vocabulary 30000, d_model 64, 4 blocks, k 256, the decoder objective, weight
max 0.5 linear) reduced to ``--steps`` training steps per epoch of ``--batch`` × ``--seq`` tokens, ``--epochs``
epochs from start epoch ``--start-epoch``. The Koopman-off baseline runs once; every threshold warm-starts from
its checkpoint after the start epoch (shared warmup), so every threshold sees the same backbone at its first
Koopman batch. For each threshold (``fallback_mode = "relative"``: running standard deviations above the running
mean of the epoch's earlier Koopman losses; the notebook's absolute thresholds are shown beside them): the
batches cut over all Koopman epochs, the batches over their limit (each starts or restarts a cut), and the
largest score (loss − running mean) ÷ running standard deviation of a batch.
"""

from __future__ import annotations

import os
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
from koopman_search.trainer import schedule  # noqa: E402
from koopman_search.trainer.config import TrainerConfig, with_overrides  # noqa: E402
from koopman_search.trainer.data import load_corpus  # noqa: E402
from koopman_search.trainer.loop import HybridKoopmanTrainer  # noqa: E402

RELATIVE = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
ABSOLUTE = (4.0, 12.0)  # the notebook's range, on the normalised loss


class _Watch:
    """Records, for every Koopman batch the relative limit judges, how many running standard deviations its
    loss lies above the running mean, and how many batches went over their limit."""

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.triggers = 0
        self._inner = schedule.FallbackState.effective_weight

    def __enter__(self) -> _Watch:
        watch = self

        def effective_weight(state: schedule.FallbackState, weight: float, loss: torch.Tensor) -> torch.Tensor:
            value, limit = float(loss.detach()), float(state.limit())
            std = float(state.running_var.sqrt())
            if int(state.seen) >= schedule.WARMUP_BATCHES and std > 0:
                watch.scores.append((value - float(state.running)) / std)
            watch.triggers += int(value > limit)
            return watch._inner(state, weight, loss)

        schedule.FallbackState.effective_weight = effective_weight  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        schedule.FallbackState.effective_weight = self._inner  # type: ignore[method-assign]


def main() -> None:
    parser = doc_parser(__doc__ or "")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--start-epoch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default="files:" + os.path.relpath(WIKITEXT2))
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    base: dict[str, Any] = {
        **reduced_user_setup(args.data, args.seq, args.batch, args.epochs, args.start_epoch, args.steps),
        "koopman.weight_max": 0.5,
        "train.max_eval_batches": 2,
        "train.linear_fit_tokens": 0,  # not measured here
    }
    started = time.perf_counter()
    cfg0 = with_overrides(TrainerConfig(), {**base, "koopman.enabled": False})
    corpus = load_corpus(cfg0.data.source, cfg0.data.vocab_size, cfg0.data.cache_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        HybridKoopmanTrainer(cfg0, corpus).fit(checkpoint_dir=tmp)
        for mode, threshold in [("relative", t) for t in RELATIVE] + [("absolute", t) for t in ABSOLUTE]:
            cfg = with_overrides(
                TrainerConfig(), {**base, "koopman.fallback_mode": mode, "koopman.fallback_threshold": threshold}
            )
            trainer = HybridKoopmanTrainer(cfg, corpus)
            trainer.warm_start_from(Path(tmp) / f"epoch_{args.start_epoch}.pt")
            with _Watch() as watch:
                records = trainer.fit()
            koop = [r for r in records if r.koopman_weight > 0]
            rows.append(
                [
                    mode,
                    threshold,
                    sum(r.steps for r in koop),
                    watch.triggers,
                    sum(r.fallback_batches for r in koop),
                    max(watch.scores) if watch.scores else float("nan"),
                    records[-1].val_ppl,
                ]
            )
            print(f"{mode} {threshold}: {rows[-1][4]} cut ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    print(
        markdown_table(
            (
                "mode",
                "threshold",
                "Koopman batches",
                "batches over the limit",
                "batches cut",
                "largest (loss − running mean) ÷ running std",
                "final val_ppl",
            ),
            rows,
        )
    )
    print(
        f"\nreduced: {args.steps} steps of {args.batch} x {args.seq} per epoch, epochs {args.start_epoch + 1}.."
        f"{args.epochs} with the Koopman loss on; {machine_line()}; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
