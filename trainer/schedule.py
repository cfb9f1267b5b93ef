"""The Koopman weight schedule and the fallback: pure functions of the epoch, and of device tensors.

Epochs are numbered 1..E. With s = ``koopman_start_epoch``, epochs 1..s are pure LM training (weight 0) and
the Koopman loss is on from epoch s+1; the weight reaches ``koopman_weight_max`` exactly at e = E
(docs/design.md, "Epochs"). The notebook's schedule gave 0 at its first Koopman epoch and never reached the
maximum (0.4286 of 0.5 at its last epoch; docs/koopman-objective.md, "Timing against the notebook").

With p = (e − s) / (E − s) in (0, 1] the progress through the Koopman epochs:

* ``linear``:      w = w_max · p
* ``exponential``: w = w_max · EXP_RANGE^(p − 1)   (grows by the same factor every epoch)
* ``cosine``:      w = w_max · (1 − cos(π p)) / 2
* ``step``:        w = w_max                        (the full weight from the first Koopman epoch)
"""

from __future__ import annotations

import math

import torch

from koopman_search.trainer.config import FALLBACK_MODES, KoopmanConfig

__all__ = ["EXP_RANGE", "FALLBACK_MODES", "RUNNING_DECAY", "WARMUP_BATCHES", "FallbackState", "koopman_weight"]

# The exponential schedule's weight at p = 0 is w_max / EXP_RANGE: a hundredfold rise over the ramp.
EXP_RANGE = 100.0
# The relative fallback's running moments forget with this factor per batch: about the last 10 batches, the
# length of a cut (fallback_batches = 10); they are trusted after WARMUP_BATCHES batches of an epoch.
RUNNING_DECAY = 0.9
WARMUP_BATCHES = 5


def koopman_weight(epoch: int, cfg: KoopmanConfig, epochs: int) -> float:
    """The scheduled Koopman weight of ``epoch`` (1-based) in a run of ``epochs`` epochs."""
    if not cfg.enabled or epoch <= cfg.start_epoch or cfg.weight_max == 0:
        return 0.0
    if cfg.start_epoch >= epochs:
        return 0.0
    p = min(1.0, (epoch - cfg.start_epoch) / (epochs - cfg.start_epoch))
    if cfg.schedule == "linear":
        return cfg.weight_max * p
    if cfg.schedule == "exponential":
        return cfg.weight_max * EXP_RANGE ** (p - 1.0)
    if cfg.schedule == "cosine":
        return cfg.weight_max * (1.0 - math.cos(math.pi * p)) / 2.0
    if cfg.schedule == "step":
        return cfg.weight_max
    raise ValueError(f"unknown schedule {cfg.schedule!r}")  # config validation makes this unreachable


class FallbackState:
    """Per-epoch fallback, kept on the device so that a step needs no host sync.

    When a batch's Koopman loss exceeds its limit, the weight is multiplied by ``factor`` for that batch and
    the next ``n_batches`` batches, whatever their own loss (the notebook only ever cut batches that were over
    the threshold anyway). A NaN/Inf Koopman loss switches the term off for the rest of the epoch.

    The limit (``mode``, docs/koopman-objective.md, "The fallback"):

    * ``"relative"``: the running mean of the epoch's earlier finite Koopman losses plus ``threshold`` times
      their running standard deviation (exponential moments over about ``1 / (1 − RUNNING_DECAY)`` batches):
      a batch ``threshold`` standard deviations above the recent ones. A spike detector whatever the
      objective's scale or noise; the normalised decoder loss has no scale for the notebook's absolute
      thresholds (4–12) to mean anything. The epoch's first ``WARMUP_BATCHES`` batches only fill the moments.
    * ``"absolute"``: ``threshold`` itself, the notebook's form (kept for its raw smooth-L1/DMD losses).
    """

    def __init__(
        self, threshold: float, factor: float, n_batches: int, device: torch.device, mode: str = "absolute"
    ) -> None:
        if mode not in FALLBACK_MODES:
            raise ValueError(f"mode must be one of {FALLBACK_MODES}, but got mode={mode!r}")
        self.threshold = threshold
        self.factor = factor
        self.n_batches = n_batches
        self.relative = mode == "relative"
        self.remaining = torch.zeros((), dtype=torch.int64, device=device)
        self.off = torch.zeros((), dtype=torch.bool, device=device)
        self.cut_count = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_count = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)  # finite batches in the moments
        self.running = torch.zeros((), dtype=torch.float32, device=device)  # exponential mean
        self.running_var = torch.zeros((), dtype=torch.float32, device=device)  # exponential variance

    def limit(self) -> torch.Tensor:
        """The Koopman loss above which this batch cuts the weight (+inf while the moments fill)."""
        if self.relative:
            limit = self.running + self.threshold * self.running_var.sqrt()
            return torch.where(self.seen >= WARMUP_BATCHES, limit, math.inf)
        return torch.full_like(self.running, self.threshold)

    def effective_weight(self, weight: float, koopman_loss: torch.Tensor) -> torch.Tensor:
        """The weight to apply to this batch's Koopman loss (a 0-dim tensor); updates the state."""
        loss = koopman_loss.detach().float()
        finite = torch.isfinite(loss)
        self.nonfinite_count += (~finite).long()
        self.off |= ~finite
        over = finite & (loss > self.limit())
        self._update_moments(loss, finite)
        self.remaining = torch.where(over, self.n_batches + 1, self.remaining)  # this batch + the next n
        cut = self.remaining > 0
        self.cut_count += (cut & ~self.off).long()
        self.remaining = (self.remaining - 1).clamp_min(0)
        w = torch.where(cut, weight * self.factor, weight)
        return torch.where(self.off, 0.0, w)

    def _update_moments(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        """Exponentially weighted mean and variance of the finite losses (West 1979's incremental form)."""
        alpha = 1.0 - RUNNING_DECAY
        first = self.seen == 0
        diff = loss - self.running
        mean = torch.where(first, loss, self.running + alpha * diff)
        var = torch.where(first, 0.0, RUNNING_DECAY * (self.running_var + alpha * diff * diff))
        self.running = torch.where(finite, mean, self.running)
        self.running_var = torch.where(finite, var, self.running_var)
        self.seen += finite.long()
