"""Tiny trainer configs and record comparison for the trainer and CLI tests.

A tiny run (builtin corpus, vocabulary 2000, d_model 16, 2 blocks, 5 steps of 8 × 16 tokens per epoch,
3 validation batches) takes well under a second on CPU, so the equality tests can afford several runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from koopman_search.trainer.config import TrainerConfig, config_from_dict, with_overrides
from koopman_search.trainer.records import EpochRecord

# Wall-clock fields: the only record fields allowed to differ between two runs of the same computation.
TIMING_FIELDS = ("seconds", "tokens_per_s")

TINY: dict[str, dict[str, Any]] = {
    "data": {"source": "builtin", "vocab_size": 2000, "seq_len": 16, "batch_size": 8},
    "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "dropout": 0.0},
    "koopman": {"dim": 8, "start_epoch": 1, "weight_max": 0.5},
    "train": {"epochs": 3, "device": "cpu", "max_steps_per_epoch": 5, "max_eval_batches": 3},
}


def tiny_config(overrides: Mapping[str, Any] | None = None) -> TrainerConfig:
    """The tiny config with dotted overrides, e.g. ``{"koopman.dim": 16}``."""
    return with_overrides(config_from_dict(TINY, origin="tiny"), dict(overrides or {}), origin="test")


def comparable(records: Sequence[EpochRecord]) -> list[dict[str, Any]]:
    """Records without their timing fields, NaN spelled out so that equal runs compare equal."""
    return [
        {
            key: "nan" if isinstance(value, float) and math.isnan(value) else value
            for key, value in record.to_dict().items()
            if key not in TIMING_FIELDS
        }
        for record in records
    ]
