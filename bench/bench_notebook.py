"""The notebook, reproduced: its first run on the researcher's own model, epoch by epoch, beside theirs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_notebook.py     # about 15 min on one CPU thread

The study file examples/resnet_bk/notebook.toml (the ResNet-BK example model through model.factory and
model.blocks_attr; smooth-L1 latent loss, K refitted by the notebook's streaming DMD, the absolute fallback)
with the notebook's first run as its parameters: weight max 0.5, start epoch 3, threshold 10, linear schedule,
Koopman dim 256. Reduced to fit a CPU (flags below): ``--steps`` training steps of 32 × 128 tokens per epoch
(the notebook: a whole WikiText-2 epoch, about 500), ``--eval-batches`` validation batches, vocabulary
``--vocab`` (30000), lr ``--lr`` (1e-3; the short epochs need more to bring the LM loss near the notebook's).
The DMD buffer holds 100 batch-mean pairs as the notebook's, so at 25 steps per epoch it fills during the 4th
Koopman epoch.

The matched baseline (Koopman off, same seed) runs first; the trial starts from its checkpoint after epoch 3
(shared warmup: epochs 1..3 are the baseline's). Each epoch's record is judged by the study's own prune rules
(search/pruning/rules.py) as a worker would, without stopping the run, so every epoch is shown. Printed: the
per-epoch table (with φ's scale, ‖K‖₂ and the fallback's cut batches), the user's table, and which rule fired
where. The records also go to bench/results/notebook.json (``--json ""`` for none).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from bench._common import WIKITEXT2, doc_parser, machine_line, markdown_table, setup_logging  # noqa: E402
from koopman_search.search.pruning.rules import PruneRules  # noqa: E402
from koopman_search.search.studyfile.spec import load_spec  # noqa: E402
from koopman_search.trainer.config import with_overrides  # noqa: E402
from koopman_search.trainer.data import load_corpus  # noqa: E402
from koopman_search.trainer.loop import HybridKoopmanTrainer  # noqa: E402

STUDY = REPO / "examples" / "resnet_bk" / "notebook.toml"
NOTEBOOK_RUN = {
    "koopman_weight_max": 0.5,
    "koopman_start_epoch": 3,
    "fallback_threshold": 10.0,
    "schedule": "linear",
    "koopman_dim": 256,
}
# The user's table (their epochs 4..10; their weight at epoch e is this trainer's at e - 1, see
# docs/koopman-objective.md, "Timing against the notebook").
USER = {
    "epoch": [4, 5, 6, 7, 8, 9, 10],
    "lm_loss": [6.2687, 6.2275, 6.1917, 6.2062, 6.2114, 6.1874, 6.2183],
    "koopman_loss": [0, 2.0563, 3.9526, 4.9417, 4.8001, 5.1835, 4.6448],
    "weight": [0, 0.0714, 0.1429, 0.2143, 0.2857, 0.3571, 0.4286],
    "total_loss": [6.2687, 6.3411, 6.6788, 7.1401, 7.5829, 7.7511, 8.0606],
}
RESULTS = REPO / "bench" / "results" / "notebook.json"


def main() -> None:
    parser = doc_parser(__doc__ or "")
    parser.add_argument("--steps", type=int, default=25, help="training steps per epoch (default 25)")
    parser.add_argument("--eval-batches", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--data", default=f"files:{WIKITEXT2}")
    parser.add_argument(
        "--dmd-buffer",
        type=int,
        default=100,
        help="batch-mean pairs in the DMD buffer (default 100, the notebook's; at 25 steps per epoch, 5 is the "
        "same share of an epoch as the notebook's 100 of its ~510 steps)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    spec = load_spec(STUDY)
    reduced = {
        "data.source": args.data,
        "data.vocab_size": args.vocab,
        "train.max_steps_per_epoch": args.steps,
        "train.max_eval_batches": args.eval_batches,
        "train.lr": args.lr,
        "train.device": "cpu",
        "koopman.dmd_buffer": args.dmd_buffer,
    }
    cfg = with_overrides(spec.trial_config(NOTEBOOK_RUN), reduced, origin="bench")
    corpus = load_corpus(cfg.data.source, cfg.data.vocab_size)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        baseline = HybridKoopmanTrainer(cfg.without_koopman(), corpus)
        baseline.fit(checkpoint_dir=scratch)
        trial = HybridKoopmanTrainer(cfg, corpus)
        trial.warm_start_from(Path(scratch) / f"epoch_{cfg.koopman.start_epoch}.pt")
        trial.fit()
    base = baseline.records
    rules = PruneRules.from_spec(spec.rules, [r.val_ppl for r in base], [r.total_loss for r in base])
    rows, fired = [], []
    for r, b in zip(trial.records, base, strict=True):
        reason = rules.check(r)
        if reason:
            fired.append(f"epoch {r.epoch}: {reason}")
        rows.append(
            [
                r.epoch, r.lm_loss, r.koopman_loss, r.koopman_weight, r.effective_weight, r.total_loss,
                r.fallback_batches, r.val_ppl, r.val_ppl / b.val_ppl, r.koopman_k_norm, r.phi_scale,
                r.val_koopman_nre, r.val_linear_nre,
            ]
        )  # fmt: skip
    headers = (
        "epoch", "LM loss", "Koopman loss", "weight", "effective weight", "total loss", "cut batches",
        "val_ppl", "vs baseline", "‖K‖₂", "φ scale", "val_koopman_nre", "val_linear_nre",
    )  # fmt: skip
    print(f"The notebook's first run on ResNet-BK ({STUDY.relative_to(REPO)}), {args.steps} steps per epoch:\n")
    print(markdown_table(headers, rows))
    print("\nThe user's run (their notebook, whole WikiText-2 epochs):\n")
    print(
        markdown_table(
            ("epoch", "LM loss", "Koopman loss", "weight", "total loss"), list(zip(*USER.values(), strict=True))
        )
    )
    print("\nThe study's rules on this run (as a worker judges each epoch):")
    print("\n".join(f"- {line}" for line in fired) if fired else "- no rule fired")
    print(f"\nBaseline final val_ppl {base[-1].val_ppl:.4g}; {time.perf_counter() - started:.0f} s in all.")
    print(
        f"Reduced: {args.steps} steps of {cfg.data.batch_size} x {cfg.data.seq_len} tokens per epoch, "
        f"{args.eval_batches} validation batches, vocabulary {args.vocab}, lr {args.lr:g}, "
        f"DMD buffer {args.dmd_buffer}, "
        f"{args.threads} torch thread(s)"
    )
    print(machine_line())
    if args.json:
        out = {
            "settings": {**vars(args), "params": NOTEBOOK_RUN},
            "trial": [r.to_dict() for r in trial.records],
            "baseline": [r.to_dict() for r in base],
            "rules_fired": fired,
        }
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
