"""A ResNet-BK language model, written from the architecture's public description, plugged in as it is.

ResNet-BK (T. Arai, "Project ResNet-BK: an O(N) language model architecture") replaces attention by a
"BK-core": each block turns its hidden states into a potential v along the sequence, builds the tridiagonal
Hamiltonian H = H₀ + diag(v) with H₀ = tridiag(1, −2, 1) (the discrete Laplacian), and reads out the diagonal of
its resolvent G = (H − z I)⁻¹ at z = i: an O(T) computation whose output mixes information along the whole
sequence. Its feed-forward is a mixture of experts with hard top-1 routing. This is the form the researcher
trained with the hybrid Koopman loss:

    block(x) = x + layer(LayerNorm(x))
    layer(u) = W_out [Re G_tt, Im G_tt] + moe(u),   v = W_v moe(u),   G = (H₀ + diag(v) − i I)⁻¹

with PyTorch's default initialisation everywhere, untied embeddings and LM head, and a ``forward`` that returns
the logits only. The trainer finds the blocks with ``model.blocks_attr = "blocks"`` and captures their inputs
and outputs with forward hooks (trainer/model.py): the model needs no change to be searched.

Routing: in training each token picks one expert by a hard Gumbel-softmax sample (straight-through, so the
gate learns), drawn from torch's global generator, whose state the trainer's checkpoints hold; in evaluation it
takes the gate's argmax, so validation is deterministic.

The resolvent's diagonal is computed by two continued fractions, one from each end of the sequence:

    α₀ = a₀,  αₜ = aₜ − 1/αₜ₋₁;    β_{T−1} = a_{T−1},  βₜ = aₜ − 1/βₜ₊₁;    G_tt = 1 / (αₜ + βₜ − aₜ)

with aₜ = −2 + vₜ − z. For a real potential and Im z = 1 every αₜ and βₜ has an imaginary part ≤ −1, so no
division comes near zero, whatever v is. It runs in float64 and is differentiated by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from koopman_search.trainer.config import ModelConfig

__all__ = ["BKBlock", "MixtureOfExperts", "ResNetBK", "build", "resolvent_diagonal"]

N_EXPERTS = 4  # the architecture's default
Z = 1j  # the spectral point the resolvent is read at


def resolvent_diagonal(potential: torch.Tensor, z: complex = Z) -> torch.Tensor:
    """diag((H₀ + diag(v) − z I)⁻¹) for every sequence of ``potential`` (B, T): complex128 (B, T)."""
    a = (potential.double() - 2.0).to(torch.complex128) - z
    steps = a.shape[-1]
    alpha = [a[:, 0]]
    for t in range(1, steps):
        alpha.append(a[:, t] - 1.0 / alpha[-1])
    beta = [a[:, steps - 1]]
    for t in range(steps - 2, -1, -1):
        beta.append(a[:, t] - 1.0 / beta[-1])
    beta.reverse()
    return 1.0 / (torch.stack(alpha, -1) + torch.stack(beta, -1) - a)


class MixtureOfExperts(nn.Module):
    """Feed-forward experts (d → 2d → d, ReLU), one per token, chosen by a learnt gate."""

    def __init__(self, d_model: int, n_experts: int = N_EXPERTS) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
            for _ in range(n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)  # (B, T, E)
        if self.training:
            choice = F.gumbel_softmax(logits, tau=1.0, hard=True)  # one-hot, straight-through gradient
        else:
            choice = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(x.dtype)
        out = torch.stack([expert(x) for expert in self.experts], -1)  # (B, T, d, E)
        return (out * choice.unsqueeze(-2)).sum(-1)


class BKBlock(nn.Module):
    """x + layer(LayerNorm(x)), the layer being the BK-core read-out plus the experts' output."""

    def __init__(self, d_model: int, n_experts: int = N_EXPERTS) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.moe = MixtureOfExperts(d_model, n_experts)
        self.potential = nn.Linear(d_model, 1)
        self.readout = nn.Linear(2, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ffn = self.moe(self.norm(x))
        g = resolvent_diagonal(self.potential(ffn).squeeze(-1))  # (B, T)
        features = torch.stack([g.real, g.imag], -1).to(x.dtype)  # (B, T, 2)
        return x + self.readout(features) + ffn


class ResNetBK(nn.Module):
    """Token and position embeddings → ``n_layers`` BK blocks → LayerNorm → LM head; ``forward`` returns logits."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, seq_len: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(BKBlock(d_model) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        h = self.token_embedding(idx) + self.position_embedding(positions)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.norm(h))  # (B, T, vocab)


def build(cfg: ModelConfig, vocab_size: int, seq_len: int) -> ResNetBK:
    """The factory: ``model.factory = "examples.resnet_bk.model:build"``, ``model.blocks_attr = "blocks"``."""
    return ResNetBK(vocab_size, cfg.d_model, cfg.n_layers, seq_len)
