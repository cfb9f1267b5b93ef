"""The Koopman part: a lifting φ and an operator K per block, the loss, the ridge fit and the NRE metric.

All blocks are held as stacked parameters of shape (L, ...) so that the L liftings run as one batched
matmul instead of L small ones; block ``l`` uses slice ``[l]`` everywhere.

K has exactly one owner (the seed trainer let gradient descent and a pseudo-inverse refit fight over it):

* ``fit = "gradient"``: K is an ``nn.Parameter`` trained with the rest.
* ``fit = "lstsq"``: K is a buffer, refit without gradients every ``update_interval`` steps by ridge least
  squares from second moments accumulated over every sampled token of the batches since the last refit
  (the seed collapsed each batch into one averaged state pair and kept 100 of them: rank <= 100 in a
  256-dimensional space, so its pseudo-inverse amplified noise and K's norm grew to ~1e3).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import KoopmanConfig

__all__ = ["KoopmanHeads", "NREAccumulator", "ridge_solve"]

logger = logging.getLogger(__name__)


def _uniform_(t: torch.Tensor, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init range
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


def ridge_solve(cxx: torch.Tensor, cyx: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """K minimising Σ‖y − K x‖² + lam‖K‖²_F from second moments, batched over blocks.

    cxx = Σ x xᵀ (L, k, k), cyx = Σ y xᵀ (L, k, k); returns K (L, k, k) = cyx (cxx + lam I)⁻¹, solved in
    float64. Raises ``torch.linalg.LinAlgError`` when the system is singular (never with lam > 0 and
    finite moments).
    """
    k = cxx.shape[-1]
    eye = torch.eye(k, dtype=torch.float64, device=cxx.device)
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=cxx.device).reshape(-1, 1, 1)
    a = cxx.double() + lam_t * eye  # (L, k, k), symmetric positive definite
    # K A = cyx  <=>  A Kᵀ = cyxᵀ (A symmetric)
    kt = torch.linalg.solve(a, cyx.double().transpose(-1, -2))
    return kt.transpose(-1, -2).to(cxx.dtype)


class KoopmanHeads(nn.Module):
    """φ_l and K_l for every block l = 1..L, stacked."""

    kt: torch.Tensor  # Kᵀ (L, k, k): a Parameter (gradient fit) or a buffer (lstsq fit)
    cxx: torch.Tensor  # lstsq buffers
    cyx: torch.Tensor
    count: torch.Tensor

    def __init__(self, cfg: KoopmanConfig, d_model: int, n_layers: int, seed: int) -> None:
        super().__init__()
        L, d, k = n_layers, d_model, cfg.dim
        self.cfg = cfg
        # A private generator: creating these modules never moves the global RNG, so the backbone's
        # initialisation and dropout stream are the same for every Koopman setting (shared warmup).
        g = torch.Generator().manual_seed(seed * 1_000_003 + 0x4B4F4F50)
        self.w1 = nn.Parameter(_uniform_(torch.empty(L, d, k), d, g))  # (L, d, k)
        self.b1 = nn.Parameter(_uniform_(torch.empty(L, 1, k), d, g))
        self.w2 = nn.Parameter(_uniform_(torch.empty(L, k, k), k, g))  # (L, k, k)
        self.b2 = nn.Parameter(_uniform_(torch.empty(L, 1, k), k, g))
        if cfg.lifting == "layernorm":
            self.ln_weight: nn.Parameter | None = nn.Parameter(torch.ones(L, 1, k))
            self.ln_bias: nn.Parameter | None = nn.Parameter(torch.zeros(L, 1, k))
        else:
            self.ln_weight = self.ln_bias = None
        # K starts at the identity (a block that changes nothing is perfectly linear), stored transposed
        # so that K x for row vectors x is x @ Kᵀ.
        kt = torch.eye(k).repeat(L, 1, 1)  # (L, k, k)
        if cfg.fit == "gradient":
            self.kt = nn.Parameter(kt)
        else:
            self.register_buffer("kt", kt)
            self.register_buffer("cxx", torch.zeros(L, k, k))  # Σ x xᵀ since the last refit
            self.register_buffer("cyx", torch.zeros(L, k, k))  # Σ y xᵀ
            self.register_buffer("count", torch.zeros(()))
        self.refit_errors = 0

    def lift(self, h: torch.Tensor) -> torch.Tensor:
        """φ for every block at once: (L, N, d) -> (L, N, k)."""
        z = torch.baddbmm(self.b1, h, self.w1)  # (L, N, k)
        if self.ln_weight is not None and self.ln_bias is not None:
            z = F.layer_norm(z, z.shape[-1:]) * self.ln_weight + self.ln_bias
        return torch.baddbmm(self.b2, torch.tanh(z), self.w2)  # (L, N, k)

    @staticmethod
    def gather(hidden: list[torch.Tensor], index: torch.Tensor | None) -> torch.Tensor:
        """The states the Koopman part sees, as one float32 tensor: (L+1, N, d).

        hidden: n_layers + 1 tensors (B, T, d); index: flat token positions (N,) into B*T (all when None).
        The result is the Koopman branch's own tensor (the LM never reads it), so a gradient hook on it
        sees the Koopman gradient alone.
        """
        h = torch.stack(hidden).flatten(1, 2)  # (L+1, B*T, d)
        if index is not None:
            h = h.index_select(1, index)  # (L+1, N, d)
        return h.float()

    def lift_pairs(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """φ(h_in), φ(h_out) for every block: states (L+1, N, d) from :meth:`gather` -> two (L, N, k)."""
        n = states.shape[1]
        # inputs and outputs of each block share its φ: lift them as one token axis of length 2N
        phi = self.lift(torch.cat((states[:-1], states[1:]), dim=1))  # (L, 2N, k)
        return phi[:, :n], phi[:, n:]

    @torch.no_grad()
    def drop_grads_unless(self, ok: torch.Tensor) -> None:
        """Zero the heads' gradients unless ``ok`` (a 0-dim bool tensor on the device; no host sync)."""
        bad = ~ok
        for p in self.parameters():
            if p.grad is not None:
                p.grad.masked_fill_(bad, 0.0)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean per-token loss between K φ(h_in) and φ(h_out), averaged over blocks. x, y: (L, N, k)."""
        pred = torch.bmm(x, self.kt)  # (L, N, k) = K x for each row
        if self.cfg.loss == "mse":
            return F.mse_loss(pred, y)
        return F.smooth_l1_loss(pred, y)

    # ---- lstsq ownership of K --------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate(self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add the second moments of token pairs (L, N, k) to the running sums (lstsq mode), in the sums'
        dtype (float32 in training; float64 after ``.double()``). With ``keep`` (a 0-dim bool tensor) false,
        the pairs add nothing: one non-finite batch would otherwise poison the whole refit window."""
        x, y = x.detach().to(self.cxx.dtype), y.detach().to(self.cxx.dtype)
        n: int | torch.Tensor = x.shape[1]
        if keep is not None:
            x, y = torch.where(keep, x, 0.0), torch.where(keep, y, 0.0)
            n = keep * n
        self.cxx.baddbmm_(x.transpose(1, 2), x)  # (L, k, k)
        self.cyx.baddbmm_(y.transpose(1, 2), x)
        self.count += n

    @torch.no_grad()
    def refit(self) -> bool:
        """Refit K from the accumulated moments, then reset them. Returns False when the solve failed
        (K is kept, the failure is counted and logged, never swallowed)."""
        if float(self.count) == 0:
            return False
        k = self.cxx.shape[-1]
        # ridge relative to the mean energy per dimension, so one setting suits any lifting scale
        lam = self.cfg.ridge * torch.diagonal(self.cxx, dim1=-2, dim2=-1).sum(-1).double() / k  # (L,)
        lam = lam.clamp_min(1e-12)
        try:
            k_new = ridge_solve(self.cxx, self.cyx, lam)
        except torch.linalg.LinAlgError as exc:
            self.refit_errors += 1
            logger.warning("Koopman lstsq refit failed (%d so far), keeping the previous K: %s",
                           self.refit_errors, exc)
            ok = False
        else:
            if torch.isfinite(k_new).all():
                self.kt.copy_(k_new.transpose(-1, -2))
                ok = True
            else:
                self.refit_errors += 1
                logger.warning("Koopman lstsq refit gave a non-finite K (%d so far), keeping the previous K",
                               self.refit_errors)
                ok = False
        self.cxx.zero_()
        self.cyx.zero_()
        self.count.zero_()
        return ok


class NREAccumulator:
    """Streams ``val_koopman_nre`` = Σ‖ỹ − K x̃‖² / Σ‖ỹ‖² (tilde: centred over all tokens), per block.

    With r = y − K x, Σ‖ỹ − K x̃‖² = Σ‖r‖² − n‖r̄‖² and Σ‖ỹ‖² = Σ‖y‖² − n‖ȳ‖², so one pass of sums
    (in float64) gives the exact centred ratio.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sums: list[torch.Tensor] = []  # Σr (L, k), Σ‖r‖² (L,), Σy (L, k), Σ‖y‖² (L,)

    def update(self, r: torch.Tensor, y: torch.Tensor) -> None:
        """r, y: (L, N, k) residuals K x − y and targets y."""
        r, y = r.double(), y.double()
        sums = [r.sum(1), (r * r).sum((1, 2)), y.sum(1), (y * y).sum((1, 2))]
        if self._sums:
            for acc, s in zip(self._sums, sums, strict=True):
                acc += s
        else:
            self._sums = sums
        self.n += r.shape[1]

    def value(self) -> float:
        """Mean over blocks of the centred normalised residual energy (NaN when nothing was seen)."""
        if not self._sums or self.n == 0:
            return math.nan
        sum_r, sum_r2, sum_y, sum_y2 = self._sums
        num = sum_r2 - (sum_r * sum_r).sum(-1) / self.n  # (L,)
        den = sum_y2 - (sum_y * sum_y).sum(-1) / self.n
        return float((num / den.clamp_min(1e-30)).mean())
