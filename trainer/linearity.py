"""How well each block can be replaced by a linear Koopman model, measured without the trial's own heads.

The trial's heads (φ, K, ψ) learn at their own pace whatever the Koopman weight, so any metric read through
them rewards how many epochs they trained (the start epoch), not what the weight did to the backbone
(docs/koopman-objective.md, "The linearity measure"). This measure fits *fresh* heads in closed form on the
frozen backbone at each evaluation: extended dynamic mode decomposition with a fixed dictionary (Williams,
Kevrekidis & Rowley 2015). It depends on the backbone alone, so two trials with equal backbones get equal
values, and the baseline gets one too.

Per block l, with z = the block input standardised by its fit-set mean and standard deviation:

    φ(h) = [z, tanh(z W + b)]          W (d, m) and b (m,): fixed random features, one draw for every trial
    ĥ_out = φ(h_in) B_l + a_l          B_l (d + m, d), a_l (1, d): ridge least squares on the fit tokens

The dictionary holds the state itself, so the decoder ψ is the projection onto the state coordinates and only
the rows of K that predict h_out are needed. The fit uses fixed training windows (the same in every epoch
and every trial); its states are held for the solve. It is scored on the validation split:

* ``val_linear_nre`` (per block, and their mean): Σ‖h_out − ĥ_out‖² / Σ‖Δ − mean Δ‖² with Δ = h_out − h_in,
  the share of the block's own update that its linear model misses (0: exactly linear in the dictionary; 1:
  no better than adding the mean update). Normalised by the update, not by h_out: the residual stream carries
  h_in through every block, and against h_out's energy every block would look linear.
* ``val_linear_ppl``: the validation perplexity with every block replaced by its linear model (chained).
"""

from __future__ import annotations

import math

import torch

from koopman_search.trainer.koopman import spd_solve

__all__ = ["DICTIONARY_SEED", "FEATURES_PER_WIDTH", "RIDGE", "LinearBlockModels", "LinearScore", "fit_linear"]

# m = FEATURES_PER_WIDTH × d random tanh features: with d = 64 the dictionary holds 64 + 256 functions, the
# size of the notebook's Koopman dim (256) plus the state.
FEATURES_PER_WIDTH = 4
# Ridge strength relative to the mean eigenvalue of the centred feature covariance: a fit that the scale of
# the states cannot change, and a solve that stays well-posed when features are collinear.
RIDGE = 1e-4
# One fixed draw of the dictionary for every trial, every epoch and the baseline: the measure compares
# backbones, never dictionaries.
DICTIONARY_SEED = 0x4C494E45
_TINY = 1e-30


class LinearBlockModels:
    """The fitted linear model of every block: ĥ_out = [z, tanh(z W + b)] B + a, z = (h_in − μ) / σ."""

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor,
        coef: torch.Tensor,
        bias: torch.Tensor,
    ) -> None:
        self.mean, self.std = mean, std  # (L, 1, d)
        self.w, self.b = w, b  # (d, m), (1, m)
        self.coef, self.bias = coef, bias  # (L, d + m, d), (L, 1, d)

    @property
    def n_layers(self) -> int:
        return int(self.coef.shape[0])

    def predict(self, h_in: torch.Tensor) -> torch.Tensor:
        """ĥ_out for every block at once: (L, N, d) → (L, N, d), in h_in's dtype."""
        f = _features(h_in.double(), self.mean, self.std, self.w, self.b)  # (L, N, d + m)
        return torch.baddbmm(self.bias, f, self.coef).to(h_in.dtype)

    def block_step(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``layer`` (0-based) replaced by its linear model, on states (..., d)."""
        shape = h.shape
        x = h.reshape(1, -1, shape[-1]).double()  # (1, N, d)
        sl = slice(layer, layer + 1)
        f = _features(x, self.mean[sl], self.std[sl], self.w, self.b)  # (1, N, d + m)
        out = torch.baddbmm(self.bias[sl], f, self.coef[sl])  # (1, N, d)
        return out.reshape(shape).to(h.dtype)


def dictionary(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed random features W (d, m) and b (1, m), float64: z W has unit variance per feature for a
    standardised z, so tanh works in its curved range."""
    g = torch.Generator().manual_seed(DICTIONARY_SEED + d)
    m = FEATURES_PER_WIDTH * d
    w = torch.randn(d, m, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.rand(1, m, generator=g, dtype=torch.float64) * 2.0 - 1.0
    return w.to(device), b.to(device)


def _features(h: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    z = (h - mean) / std  # (L, N, d)
    return torch.cat((z, torch.tanh(z @ w + b)), dim=-1)  # (L, N, d + m)


def fit_linear(h_in: torch.Tensor, h_out: torch.Tensor, ridge: float = RIDGE) -> LinearBlockModels:
    """Ridge least squares of h_out on the dictionary of h_in, per block: h_in, h_out (L, N, d).

    Solved in float64 from centred second moments (the intercept a absorbs the means)."""
    h_in, h_out = h_in.double(), h_out.double()
    d = h_in.shape[-1]
    w, b = dictionary(d, h_in.device)
    mean = h_in.mean(1, keepdim=True)  # (L, 1, d)
    std = h_in.std(1, keepdim=True).clamp_min(1e-6)  # a constant coordinate stays 0 after standardising
    f = _features(h_in, mean, std, w, b)  # (L, N, p), p = d + m
    f_mean, y_mean = f.mean(1, keepdim=True), h_out.mean(1, keepdim=True)
    fc, yc = f - f_mean, h_out - y_mean
    cff = fc.transpose(1, 2) @ fc  # (L, p, p)
    cfy = fc.transpose(1, 2) @ yc  # (L, p, d)
    p = cff.shape[-1]
    lam = (ridge * torch.diagonal(cff, dim1=-2, dim2=-1).sum(-1) / p).clamp_min(1e-12)  # (L,)
    eye = torch.eye(p, dtype=torch.float64, device=cff.device)
    coef = spd_solve(cff + lam.reshape(-1, 1, 1) * eye, cfy)  # (L, p, d); symmetric positive definite
    bias = y_mean - f_mean @ coef  # (L, 1, d)
    return LinearBlockModels(mean, std, w, b, coef, bias)


class LinearScore:
    """Streams ``val_linear_nre`` per block over validation batches, exactly (float64 sums)."""

    def __init__(self, models: LinearBlockModels) -> None:
        self.models = models
        self.n = 0
        self._sums: list[torch.Tensor] = []

    def update(self, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """One batch of block inputs and outputs (L, N, d), the block inputs being the true ones."""
        h_in, h_out = h_in.double(), h_out.double()
        err = h_out - self.models.predict(h_in)
        delta = h_out - h_in
        sums = [err.pow(2).sum((1, 2)), delta.sum(1), delta.pow(2).sum((1, 2))]  # (L,), (L, d), (L,)
        if self._sums:
            for acc, s in zip(self._sums, sums, strict=True):
                acc += s
        else:
            self._sums = sums
        self.n += h_in.shape[1]

    def per_block(self) -> list[float]:
        if not self._sums or self.n == 0:
            return []
        err, s_delta, s2_delta = self._sums
        var = s2_delta - s_delta.pow(2).sum(-1) / self.n  # Σ‖Δ − mean Δ‖²
        return (err / var.clamp_min(_TINY)).tolist()

    def value(self) -> float:
        blocks = self.per_block()
        return sum(blocks) / len(blocks) if blocks else math.nan
