"""The per-epoch record the trainer hands to its callback, and that the search stores for every trial."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["K_EIGS_PER_BLOCK", "RECORD_FIELDS", "EpochRecord"]

K_EIGS_PER_BLOCK = 8  # K's eigenvalues kept per block and epoch: the largest in modulus, which decide stability


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did. Losses are means over the epoch's training batches (docs/design.md, "Epochs")."""

    epoch: int  # 1..epochs
    epochs: int
    lm_loss: float
    koopman_loss: float  # mean raw Koopman loss over batches where it was on (0 when off)
    total_loss: float  # mean over batches of lm_loss + effective_weight * koopman_loss
    koopman_weight: float  # the scheduled weight of this epoch
    effective_weight: float  # mean over batches of the weight actually applied (after fallback)
    fallback_batches: int  # batches whose weight was cut by the fallback
    nonfinite_batches: int  # batches whose Koopman loss was NaN/Inf (the term is then off for the epoch)
    val_loss: float  # token-weighted mean validation cross-entropy
    val_ppl: float  # exp(val_loss)
    val_koopman_nre: float  # 1 - R^2 of K on centred lifted validation states, mean over blocks;
    #                         NaN in epochs where the Koopman loss is off (and in the baseline)
    seconds: float  # wall time of the epoch, evaluation included
    tokens_per_s: float  # training tokens per second of training time
    steps: int  # training steps in this epoch
    # The Koopman heads on the validation set (NaN where the Koopman loss is off; docs/koopman-objective.md):
    val_koopman_gain: float = math.nan  # Σ‖ỹ − x̃‖² / Σ‖ỹ − K x̃‖² in φ-space: times better than K = I, mean
    val_koopman_gain_blocks: list[float] = field(default_factory=list)  # the same, per block
    phi_effective_rank: float = math.nan  # participation ratio of the centred φ(h_out), mean over blocks
    state_effective_rank: float = math.nan  # the same of the block outputs h_out: what φ's is read against
    val_koopman_forward_ppl: float = math.nan  # val PPL with every block replaced by ψ ∘ K ∘ φ (decoder only)
    koopman_k_norm: float = math.nan  # ‖K‖₂ at the end of the epoch, mean over blocks
    koopman_k_radius: float = math.nan  # K's spectral radius max |λ| at the end of the epoch, mean over blocks:
    #                                     above 1, K amplifies (a linear model iterated from it explodes)
    # K's K_EIGS_PER_BLOCK largest eigenvalues (by modulus) of every block, block after block: real, imaginary
    koopman_k_eig_re: list[float] = field(default_factory=list)
    koopman_k_eig_im: list[float] = field(default_factory=list)
    # The closed-form linear replacement of every block, fitted afresh on the frozen backbone at each evaluation
    # (trainer/linearity.py): it does not depend on the trial's heads, so the baseline has it too.
    val_linear_nre: float = math.nan  # share of a block's update its linear model misses, mean over blocks
    val_linear_nre_blocks: list[float] = field(default_factory=list)  # the same, per block
    val_linear_ppl: float = math.nan  # val PPL with every block replaced by its linear model (chained)
    val_linear_ppl_ratio: float = math.nan  # val_linear_ppl ÷ val_ppl: what replacing the blocks costs
    phi_rank_ratio: float = math.nan  # phi_effective_rank ÷ the standardised states' own (1 = as spread)
    phi_scale: float = math.nan  # centred RMS of φ(h_out) per lifted coordinate, mean over blocks: a φ that
    #                              shrinks (the trivial minimum of a latent-only loss) shows here
    # The standard error of val_loss over the validation batches (each batch a cluster of neighbouring tokens;
    # NaN with fewer than two batches). val_ppl's relative standard error is the same number (d ppl / ppl =
    # d loss): how much of a difference between two trials the validation set itself cannot tell apart.
    val_loss_se: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EpochRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


RECORD_FIELDS = tuple(f.name for f in fields(EpochRecord))
