"""The Koopman part: per block a lifting φ, an operator K, (for the default objective) a decoder ψ; the
losses, the fits of K and the validation metrics.

All blocks are held as stacked parameters of shape (L, ...) so that the L liftings run as one batched
matmul instead of L small ones; block ``l`` uses slice ``[l]`` everywhere. Shapes: N tokens, d the model
width, k the Koopman dim.

The objectives (``koopman.loss``, docs/koopman-objective.md):

* ``"decoder"`` (default): reconstruction ψ(φ(h)) ≈ h, prediction ψ(K φ(h_in)) ≈ h_out and latent
  prediction K φ(h_in) + c ≈ φ(h_out), each a residual energy divided by the centred energy of its own
  target (Lusch, Kutz & Brunton 2018, normalised). Every term is invariant to the scale of φ and of h, and a
  φ collapsed to a constant or to one direction cannot reconstruct h, so the loss cannot be driven to zero
  by shrinking or collapsing φ. Plus ``koopman.spread`` × φ's isotropy gap (how far its covariance is from
  an even spread over uncorrelated directions, scale-free): the three terms alone let φ carry the states'
  information in a few large directions (its effective rank well below the states'), which the gap prevents.
* ``"smooth_l1"``, ``"mse"``: the notebook's latent-only forms between K φ(h_in) and φ(h_out); minimised by
  shrinking φ toward a constant (kept to reproduce the notebook, not to search with).

Who owns K (``koopman.fit``):

* ``"gradient"``: K (and the offset c of the decoder objective) are parameters trained with the heads.
* ``"lstsq"``: K and c are buffers, refit without gradients every ``update_interval`` steps by ridge least
  squares toward K = I from centred second moments of every sampled token since the last refit.
* ``"dmd"``: the notebook's streaming refit, reproduced with its defects on purpose (docs/koopman-objective.md):
  one batch-mean state pair per step in a circular buffer, a truncated-SVD pseudo-inverse once it is full,
  K ← (1 − α) K + α K_dmd every step; K is also a parameter trained by AdamW, so two owners fight over it.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from koopman_search.trainer.config import KoopmanConfig

__all__ = ["KoopmanHeads", "KoopmanMetrics", "dmd_operator", "ridge_solve", "spd_solve"]

logger = logging.getLogger(__name__)

_TINY = 1e-30  # guards a division by a centred energy that is exactly zero (a constant target)


def _uniform_(t: torch.Tensor, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init range
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X with A X = B for symmetric positive definite A (a ridge system), batched: by Cholesky, which costs
    half an LU. LU is also what fails, batched, in torch 2.13's CPU build once ``torch.set_num_threads`` was
    called with 2 or more ("Pivots given to lu_solve must all be greater or equal to 1"); Cholesky does not.
    Raises ``torch.linalg.LinAlgError`` when A is not positive definite."""
    return torch.cholesky_solve(b, torch.linalg.cholesky(a))


def ridge_solve(
    cxx: torch.Tensor, cyx: torch.Tensor, lam: float | torch.Tensor, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """K minimising Σ‖y − K x‖² + lam‖K − P‖²_F from second moments, batched over blocks.

    cxx = Σ x xᵀ (L, k, k), cyx = Σ y xᵀ (L, k, k), prior P (k, k) or (L, k, k), default 0; returns
    K (L, k, k) = (cyx + lam P)(cxx + lam I)⁻¹, solved in float64. Raises ``torch.linalg.LinAlgError``
    when the system is singular (never with lam > 0 and finite moments).
    """
    k = cxx.shape[-1]
    eye = torch.eye(k, dtype=torch.float64, device=cxx.device)
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=cxx.device).reshape(-1, 1, 1)
    a = cxx.double() + lam_t * eye  # (L, k, k), symmetric positive definite
    b = cyx.double() if prior is None else cyx.double() + lam_t * prior.double()
    # K A = B  <=>  A Kᵀ = Bᵀ (A symmetric)
    kt = spd_solve(a, b.transpose(-1, -2))
    return kt.transpose(-1, -2).to(cxx.dtype)


def dmd_operator(z_cur: torch.Tensor, z_next: torch.Tensor, rcond: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The notebook's DMD estimate K = Z_next Z_cur⁺ with a truncated-SVD pseudo-inverse, batched over blocks.

    z_cur, z_next: (L, k, m) columns of state pairs. Singular values at or below ``rcond`` × the largest are
    dropped. Returns K (L, k, k) and the rank kept per block (L,).
    """
    u, s, vh = torch.linalg.svd(z_cur.double(), full_matrices=False)  # (L, k, r), (L, r), (L, r, m)
    keep = s > rcond * s[:, :1]  # (L, r)
    s_inv = torch.where(keep, 1.0 / s.clamp_min(_TINY), 0.0)
    # Z⁺ = V diag(1/s) Uᵀ on the kept directions
    k_new = z_next.double() @ (vh.transpose(-1, -2) * s_inv.unsqueeze(-2)) @ u.transpose(-1, -2)  # (L, k, k)
    return k_new.to(z_cur.dtype), keep.sum(-1)


def _energy_ratio(err: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ‖err‖² / Σ‖target − mean(target)‖² per block: (L, N, m) → (L,). 1 = as bad as predicting the mean."""
    centred = target - target.mean(1, keepdim=True)
    return err.pow(2).sum((1, 2)) / centred.pow(2).sum((1, 2)).clamp_min(_TINY)


def _variance_covariance_floor(z: torch.Tensor) -> torch.Tensor:
    """VICReg's terms (Bardes, Ponce & LeCun 2022) on φ (L, N, k) → (L,): a hinge keeping every dimension's
    standard deviation at least 1, and the squared off-diagonal covariances over k."""
    zc = z - z.mean(1, keepdim=True)
    cov = zc.transpose(1, 2) @ zc / max(z.shape[1] - 1, 1)  # (L, k, k)
    std = torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1) + 1e-4)
    off = cov - torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    return F.relu(1.0 - std).mean(-1) + off.pow(2).sum((1, 2)) / z.shape[-1]


def _isotropy_gap(z: torch.Tensor) -> torch.Tensor:
    """How far φ (L, N, k) → (L,) is from spreading its variance evenly over uncorrelated directions:
    ‖C / (tr C / k) − I‖²_F / k² for its covariance C. 0 when white, about 1 when all variance lies in one
    direction; blind to φ's scale, so the decoder objective stays blind to it too."""
    zc = z - z.mean(1, keepdim=True)
    k = z.shape[-1]
    cov = zc.transpose(1, 2) @ zc  # (L, k, k), the 1/N cancels below
    mean_var = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / k  # (L,)
    normalised = cov / mean_var.clamp_min(_TINY).reshape(-1, 1, 1)
    eye = torch.eye(k, dtype=z.dtype, device=z.device)
    return (normalised - eye).pow(2).sum((1, 2)) / (k * k)


class KoopmanHeads(nn.Module):
    """φ_l, K_l (with an offset c_l for the decoder objective) and ψ_l for every block l = 1..L, stacked."""

    kt: torch.Tensor  # Kᵀ (L, k, k): a Parameter (gradient, dmd) or a buffer (lstsq)
    kb: torch.Tensor  # the latent offset c (L, 1, k); zero and fixed for the notebook's forms
    cxx: torch.Tensor  # lstsq buffers: Σx xᵀ, Σy xᵀ, Σx, Σy, count
    cyx: torch.Tensor
    sx: torch.Tensor
    sy: torch.Tensor
    count: torch.Tensor
    dmd_x: torch.Tensor  # dmd buffers: the circular buffer of batch-mean pairs (L, k, m), its cursor
    dmd_y: torch.Tensor
    dmd_pos: torch.Tensor
    dmd_filled: torch.Tensor
    initialised: torch.Tensor  # the data-dependent initialisation has run

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
        self.has_decoder = cfg.loss == "decoder"
        if self.has_decoder:
            # ψ mirrors φ (the notebook's inverse lifting: Linear(k, k) → Tanh → Linear(k, d))
            self.v1: nn.Parameter | None = nn.Parameter(_uniform_(torch.empty(L, k, k), k, g))  # (L, k, k)
            self.c1: nn.Parameter | None = nn.Parameter(_uniform_(torch.empty(L, 1, k), k, g))
            # ψ's output layer starts at zero: a random one would give errors of hundreds of times the states'
            # own spread (the backbone's init is small) and trip the fallback; at zero each term starts near 1
            self.v2: nn.Parameter | None = nn.Parameter(torch.zeros(L, k, d))  # (L, k, d)
            self.c2: nn.Parameter | None = nn.Parameter(torch.zeros(L, 1, d))
        else:
            self.v1 = self.c1 = self.v2 = self.c2 = None
        # K starts at the identity (a block that changes nothing is perfectly linear), stored transposed
        # so that K x for row vectors x is x @ Kᵀ.
        kt, kb = torch.eye(k).repeat(L, 1, 1), torch.zeros(L, 1, k)  # (L, k, k), (L, 1, k)
        if cfg.fit == "lstsq":
            self.register_buffer("kt", kt)
            self.register_buffer("kb", kb)
            self.register_buffer("cxx", torch.zeros(L, k, k))  # Σ x xᵀ since the last refit
            self.register_buffer("cyx", torch.zeros(L, k, k))  # Σ y xᵀ
            self.register_buffer("sx", torch.zeros(L, 1, k))  # Σ x
            self.register_buffer("sy", torch.zeros(L, 1, k))  # Σ y
            self.register_buffer("count", torch.zeros(()))
        else:
            self.kt = nn.Parameter(kt)
            if self.has_decoder:
                self.kb = nn.Parameter(kb)
            else:
                self.register_buffer("kb", kb)  # the notebook's K has no offset
        # Data-dependent initialisation (docs/koopman-objective.md): at the first training batch the offsets
        # start at the batch's means, so a trained backbone's residual-stream mean does not make every term
        # start far above 1. The notebook's forms keep the notebook's fixed initialisation.
        self.data_init = cfg.loss not in ("smooth_l1", "mse")
        self.register_buffer("initialised", torch.tensor(not self.data_init))
        self._initialised: bool | None = None
        if cfg.fit == "dmd":
            m = cfg.dmd_buffer
            self.register_buffer("dmd_x", torch.zeros(L, k, m))
            self.register_buffer("dmd_y", torch.zeros(L, k, m))
            self.register_buffer("dmd_pos", torch.zeros((), dtype=torch.long))
            self.register_buffer("dmd_filled", torch.zeros((), dtype=torch.bool))
            self.last_dmd_rank: torch.Tensor | None = None
        self.refit_errors = 0

    # ---- the maps ------------------------------------------------------------------------------------------
    def lift(self, h: torch.Tensor) -> torch.Tensor:
        """φ for every block at once: (L, N, d) -> (L, N, k)."""
        z = torch.baddbmm(self.b1, h, self.w1)  # (L, N, k)
        if self.ln_weight is not None and self.ln_bias is not None:
            z = F.layer_norm(z, z.shape[-1:]) * self.ln_weight + self.ln_bias
        return torch.baddbmm(self.b2, torch.tanh(z), self.w2)  # (L, N, k)

    def advance(self, z: torch.Tensor) -> torch.Tensor:
        """K z + c for every block: (L, N, k) -> (L, N, k)."""
        return torch.baddbmm(self.kb, z, self.kt)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """ψ for every block: (L, N, k) -> (L, N, d). Only for the decoder objective."""
        if self.v1 is None or self.c1 is None or self.v2 is None or self.c2 is None:
            raise RuntimeError(f"koopman.loss={self.cfg.loss!r} has no decoder ψ")
        return torch.baddbmm(self.c2, torch.tanh(torch.baddbmm(self.c1, z, self.v1)), self.v2)

    def block_step(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """ψ_l(K_l φ_l(h) + c_l) for one block l (0-based) on states (..., d): the block replaced by its
        Koopman model (the notebook's ``use_koopman=True`` forward)."""
        if self.v1 is None or self.c1 is None or self.v2 is None or self.c2 is None:
            raise RuntimeError(f"koopman.loss={self.cfg.loss!r} has no decoder ψ")
        shape = h.shape
        x = h.reshape(-1, shape[-1]).float()  # (N, d)
        z = torch.addmm(self.b1[layer], x, self.w1[layer])
        if self.ln_weight is not None and self.ln_bias is not None:
            z = F.layer_norm(z, z.shape[-1:]) * self.ln_weight[layer] + self.ln_bias[layer]
        z = torch.addmm(self.b2[layer], torch.tanh(z), self.w2[layer])  # φ: (N, k)
        z = torch.addmm(self.kb[layer], z, self.kt[layer])  # K φ + c
        z = torch.addmm(self.c1[layer], z, self.v1[layer])
        out = torch.addmm(self.c2[layer], torch.tanh(z), self.v2[layer])  # ψ: (N, d)
        return out.reshape(shape).to(h.dtype)

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

    # ---- the objective -------------------------------------------------------------------------------------
    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialised = None  # read the loaded flag again

    @torch.no_grad()
    def _initialise_from(self, states: torch.Tensor) -> None:
        """Offsets from the first training batch: c = mean(φ(h_out) − φ(h_in)) (K = I at the start), and ψ's
        output bias = mean(h) of each block's states, so that ψ starts by predicting the mean."""
        x, y = self.lift_pairs(states)
        self.kb.copy_((y - x).mean(1, keepdim=True))
        if self.c2 is not None:
            self.c2.copy_(states[1:].mean(1, keepdim=True))
        self.initialised.fill_(True)

    def objective(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Koopman loss of ``koopman.loss`` on states (L+1, N, d); also returns φ(h_in), φ(h_out)."""
        if self.training and self.data_init:
            if self._initialised is None:
                self._initialised = bool(self.initialised)  # one host sync, then cached
            if not self._initialised:
                self._initialise_from(states.detach())
                self._initialised = True
        x, y = self.lift_pairs(states)  # (L, N, k) each
        pred = self.advance(x)
        if self.cfg.loss == "mse":
            return F.mse_loss(pred, y), x, y
        if self.cfg.loss == "smooth_l1":
            return F.smooth_l1_loss(pred, y), x, y
        lat = _energy_ratio(pred - y, y)  # normalised by φ's own spread: shrinking φ does not lower it
        if self.cfg.loss == "normalized":
            return lat.mean(), x, y
        if self.cfg.loss == "vicreg":
            return (lat + _variance_covariance_floor(y)).mean(), x, y
        h_in, h_out = states[:-1], states[1:]  # (L, N, d)
        n = x.shape[1]
        # ψ of φ(h_in), φ(h_out) and K φ(h_in) + c in one batched pass over 3N tokens
        back = self.decode(torch.cat((x, y, pred), dim=1))  # (L, 3N, d)
        rec = 0.5 * (_energy_ratio(back[:, :n] - h_in, h_in) + _energy_ratio(back[:, n : 2 * n] - h_out, h_out))
        prd = _energy_ratio(back[:, 2 * n :] - h_out, h_out)
        loss = ((rec + prd + lat) / 3).mean()
        if self.cfg.spread:
            # φ of inputs and outputs together, pulled toward an even spread over uncorrelated directions
            loss = loss + self.cfg.spread * _isotropy_gap(torch.cat((x, y), dim=1)).mean()
        return loss, x, y

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The notebook's latent loss between K φ(h_in) and φ(h_out), averaged over blocks. x, y: (L, N, k)."""
        pred = self.advance(x)
        if self.cfg.loss == "mse":
            return F.mse_loss(pred, y)
        return F.smooth_l1_loss(pred, y)

    # ---- lstsq ownership of K --------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate(self, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add the moments of token pairs (L, N, k) to the running sums (lstsq mode), in the sums' dtype
        (float32 in training; float64 after ``.double()``). With ``keep`` (a 0-dim bool tensor) false, the
        pairs add nothing: one non-finite batch would otherwise poison the whole refit window."""
        x, y = x.detach().to(self.cxx.dtype), y.detach().to(self.cxx.dtype)
        n: int | torch.Tensor = x.shape[1]
        if keep is not None:
            x, y = torch.where(keep, x, 0.0), torch.where(keep, y, 0.0)
            n = keep * n
        self.cxx.baddbmm_(x.transpose(1, 2), x)  # (L, k, k)
        self.cyx.baddbmm_(y.transpose(1, 2), x)
        self.sx += x.sum(1, keepdim=True)
        self.sy += y.sum(1, keepdim=True)
        self.count += n

    @torch.no_grad()
    def refit(self) -> bool:
        """Refit K and c from the accumulated moments, then reset them. Returns False when the solve failed
        (K is kept, the failure is counted and logged, never swallowed).

        The fit is centred (c absorbs the means) and its ridge pulls K toward the identity, not toward 0,
        with a strength relative to the mean eigenvalue of the centred input covariance, so the same
        ``ridge`` shrinks alike for every Koopman dim and every scale of φ.
        """
        n = float(self.count)
        if n == 0:
            return False
        k = self.cxx.shape[-1]
        mx, my = self.sx.double() / n, self.sy.double() / n  # (L, 1, k)
        cxx = self.cxx.double() - n * mx.transpose(1, 2) @ mx  # centred Σ x̃ x̃ᵀ (L, k, k)
        cyx = self.cyx.double() - n * my.transpose(1, 2) @ mx
        lam = (self.cfg.ridge * torch.diagonal(cxx, dim1=-2, dim2=-1).sum(-1) / k).clamp_min(1e-12)  # (L,)
        eye = torch.eye(k, dtype=torch.float64, device=cxx.device)
        try:
            k_new = ridge_solve(cxx, cyx, lam, prior=eye)
        except torch.linalg.LinAlgError as exc:
            self.refit_errors += 1
            logger.warning("Koopman lstsq refit failed (%d so far), keeping the previous K: %s", self.refit_errors, exc)
            ok = False
        else:
            c_new = my - mx @ k_new.transpose(-1, -2)  # c = ȳ − K x̄ (L, 1, k)
            if torch.isfinite(k_new).all() and torch.isfinite(c_new).all():
                self.kt.copy_(k_new.transpose(-1, -2))
                self.kb.copy_(c_new)
                ok = True
            else:
                self.refit_errors += 1
                logger.warning(
                    "Koopman lstsq refit gave a non-finite K (%d so far), keeping the previous K", self.refit_errors
                )
                ok = False
        for t in (self.cxx, self.cyx, self.sx, self.sy, self.count):
            t.zero_()
        return ok

    # ---- dmd (the notebook's refit) ------------------------------------------------------------------------
    @torch.no_grad()
    def dmd_update(self, states: torch.Tensor) -> bool:
        """One step of the notebook's streaming DMD on states (L+1, N, d): push the batch-mean pair
        (mean φ(h_in), mean φ(h_out)) per block into the circular buffer; once it has been filled, pull K
        toward Z_next Z_cur⁺ with weight ``dmd_alpha``. Returns True when K was updated. A failed SVD is
        counted and logged (the notebook swallowed it)."""
        x, y = self.lift_pairs(states)  # (L, N, k)
        pos = int(self.dmd_pos)
        self.dmd_x[:, :, pos] = x.mean(1)
        self.dmd_y[:, :, pos] = y.mean(1)
        pos = (pos + 1) % self.dmd_x.shape[-1]
        self.dmd_pos.fill_(pos)
        if pos == 0:
            self.dmd_filled.fill_(True)
        if not bool(self.dmd_filled):
            return False
        try:
            k_new, rank = dmd_operator(self.dmd_x, self.dmd_y, self.cfg.dmd_rcond)
        except torch.linalg.LinAlgError as exc:
            self.refit_errors += 1
            logger.warning("Koopman DMD refit failed (%d so far), keeping the previous K: %s", self.refit_errors, exc)
            return False
        self.last_dmd_rank = rank
        a = self.cfg.dmd_alpha
        self.kt.mul_(1 - a).add_(a * k_new.transpose(-1, -2))
        return True

    @torch.no_grad()
    def k_spectrum(self, top: int) -> tuple[float, list[float], list[float]]:
        """K's spectrum: its spectral radius (mean over blocks), and the real and imaginary parts of each
        block's ``top`` eigenvalues largest in modulus, block after block (NaN and empty where K is not
        finite)."""
        kt = self.kt.double()
        if not bool(torch.isfinite(kt).all()):
            return math.nan, [], []
        eig = torch.linalg.eigvals(kt)  # (L, k): Kᵀ and K have the same eigenvalues
        picked = torch.gather(eig, 1, eig.abs().argsort(dim=-1, descending=True)[:, :top])
        return float(eig.abs().amax(-1).mean()), picked.real.flatten().tolist(), picked.imag.flatten().tolist()

    @torch.no_grad()
    def k_norm(self) -> float:
        """‖K‖₂ (largest singular value), mean over blocks."""
        return float(torch.linalg.matrix_norm(self.kt.double(), ord=2).mean())


class KoopmanMetrics:
    """Streams the validation metrics of the Koopman heads in one pass, exactly (float64 sums), per block:

    * ``nre`` = Σ‖ỹ − (K x̃)‖² / Σ‖ỹ‖² (tilde: centred over all tokens; y = φ(h_out), x = φ(h_in)):
      1 − R² of the linear dynamics in the lifted space;
    * ``gain`` = Σ‖ỹ − x̃‖² / Σ‖ỹ − K x̃‖²: how many times better K predicts than the identity;
    * ``effective_rank`` = (tr C)² / ‖C‖²_F of the covariance C of φ(h_out) (its participation ratio: k for
      a spread φ, 1 for a φ whose variance lies in one direction);
    * ``state_effective_rank``: the same of the block outputs h_out themselves, the scale to read the
      former against (a trained residual stream is itself far from isotropic);
    * ``scale``: the centred RMS of φ(h_out) per lifted coordinate, √(Σ‖ỹ‖² / (n k)): a φ that shrinks toward
      a constant (the trivial minimum of a latent-only loss, docs/koopman-objective.md) reads near 0;
    * ``rank_ratio``: the participation ratio of φ(h_out)'s correlation matrix over that of h_out's: both
      read on standardised coordinates, so a few large residual directions do not dominate; below 1 φ is
      less spread than the states it encodes.

    With r a residual, Σ‖r̃‖² = Σ‖r‖² − n‖r̄‖², so one pass of sums gives the centred values.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sums: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor, h_out: torch.Tensor) -> None:
        """x = φ(h_in), y = φ(h_out), pred = K x + c: (L, N, k); h_out: the block outputs (L, N, d)."""
        x, y, pred, h = x.double(), y.double(), pred.double(), h_out.double()
        rk, ri = pred - y, x - y
        sums = [
            rk.sum(1),
            rk.pow(2).sum((1, 2)),
            ri.sum(1),
            ri.pow(2).sum((1, 2)),
            y.sum(1),
            torch.bmm(y.transpose(1, 2), y),  # Σy (L, k), Σ y yᵀ (L, k, k)
            h.sum(1),
            torch.bmm(h.transpose(1, 2), h),
        ]  # Σh (L, d), Σ h hᵀ (L, d, d)
        if self._sums:
            for acc, s in zip(self._sums, sums, strict=True):
                acc += s
        else:
            self._sums = sums
        self.n += x.shape[1]

    def _centred(self, s: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        return s2 - (s * s).sum(-1) / self.n  # (L,)

    def _participation(self, s: torch.Tensor, ss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cov = ss - torch.einsum("li,lj->lij", s, s) / self.n  # centred Σ ỹ ỹᵀ (L, m, m)
        var = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)  # tr C = Σ‖ỹ‖²
        return var.pow(2) / cov.pow(2).sum((1, 2)).clamp_min(_TINY), var

    def _entropy_rank(self, s: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
        """Effective rank of the centred data (Roy & Vetterli 2007): exp of the entropy of its normalised
        singular values. 1 when all variance lies in one direction, the dimension when it is spread evenly;
        unlike the participation ratio it counts a long tail of small directions, so a residual stream
        dominated by a few large directions still reads its tail (docs/koopman-objective.md, "Collapse")."""
        cov = ss - torch.einsum("li,lj->lij", s, s) / self.n  # (L, m, m)
        sv = torch.linalg.eigvalsh(cov).clamp_min(0.0).sqrt()  # singular values of the centred data (L, m)
        p = sv / sv.sum(-1, keepdim=True).clamp_min(_TINY)
        return torch.exp(-(p * torch.log(p.clamp_min(_TINY))).sum(-1))

    def per_block(self) -> dict[str, list[float]]:
        """nre, gain and effective_rank of every block (NaN lists when nothing was seen)."""
        names = ("nre", "gain", "effective_rank", "state_effective_rank", "rank_ratio", "scale")
        if not self._sums or self.n == 0:
            return {name: [] for name in names}
        srk, srk2, sri, sri2, sy, syy, sh, shh = self._sums
        err_k, err_i = self._centred(srk, srk2), self._centred(sri, sri2)
        rank, var = self._participation(sy, syy)
        state_rank, _ = self._participation(sh, shh)
        # Collapse read on standardised coordinates, relative to the states φ encodes: a raw participation
        # ratio of a residual stream dominated by a few large directions reads ~1 for the states too
        # (docs/koopman-objective.md, "Collapse").
        ratio = self._entropy_rank(sy, syy) / self._entropy_rank(sh, shh)
        return {
            "nre": (err_k / var.clamp_min(_TINY)).tolist(),
            "gain": (err_i / err_k.clamp_min(_TINY)).tolist(),
            "effective_rank": rank.tolist(),
            "state_effective_rank": state_rank.tolist(),
            "rank_ratio": ratio.tolist(),
            "scale": (var.clamp_min(0.0) / (self.n * sy.shape[-1])).sqrt().tolist(),
        }

    def values(self) -> dict[str, float]:
        """Means over blocks (NaN when nothing was seen)."""
        blocks = self.per_block()
        return {name: (sum(v) / len(v) if v else math.nan) for name, v in blocks.items()}
