"""Collapse of φ on a live run: its effective rank against the states', with and without the isotropy term.

    .venv/bin/python bench/bench_collapse.py            # about a minute

The live setting of tests/trainer/test_linearity.py (builtin corpus, d_model 32, 2 blocks, k 32, 40 steps of
8 × 32 tokens per epoch, 3 epochs, Koopman loss on from epoch 2, weight max 0.5) for ``koopman.spread`` 0 (the
three-term decoder objective) and 1 (the default), over ``--seeds``. Per Koopman epoch: ``phi_rank_ratio``
(φ(h_out)'s effective rank over h_out's; docs/koopman-objective.md, "Collapse"), val_ppl, and the Koopman loss.
The last line reads the same trained run through a φ collapsed onto one direction: the value a collapse shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
import torch  # noqa: E402

from bench._common import doc_parser, machine_line, markdown_table, setup_logging  # noqa: E402
from koopman_search.trainer.config import with_overrides  # noqa: E402
from koopman_search.trainer.loop import HybridKoopmanTrainer  # noqa: E402
from tests.trainer.test_linearity import LIVE  # noqa: E402
from tests.trainer.tiny import tiny_config  # noqa: E402


def main() -> None:
    parser = doc_parser(__doc__ or "")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    rows = []
    collapsed = []
    for spread in (0.0, 1.0):
        for seed in args.seeds:
            cfg = with_overrides(tiny_config(), {**LIVE, "koopman.spread": spread, "train.seed": seed})
            trainer = HybridKoopmanTrainer(cfg)
            for r in trainer.fit()[1:]:
                rows.append([spread, seed, r.epoch, r.phi_rank_ratio, r.val_ppl, r.koopman_loss])
            heads = trainer.koopman
            assert heads is not None
            with torch.no_grad():
                direction = torch.randn(1, 1, heads.w2.shape[-1], generator=torch.Generator().manual_seed(0))
                heads.w2.copy_(heads.w2[..., :1] * direction)
            collapsed.append(trainer.evaluate()["phi_rank_ratio"])
    print(markdown_table(("koopman.spread", "seed", "epoch", "phi_rank_ratio", "val_ppl", "koopman_loss"), rows))
    print(f"\nφ collapsed onto one direction, same runs: phi_rank_ratio {min(collapsed):.3g}–{max(collapsed):.3g}")
    print(machine_line())


if __name__ == "__main__":
    main()
