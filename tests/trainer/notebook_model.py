"""A model written like the notebook's, plugged in with ``model.factory`` and ``model.blocks_attr = "blocks"``.

Pre-LayerNorm residual blocks whose inner layer is a small mixture of experts (top-1 routing, as the notebook's
ResNet-BK layer; its BK-core is left out), held in ``self.blocks``; PyTorch's default initialisation; and a
``forward`` that returns logits only, with an optional ``use_koopman`` flag it never needs here. It follows none
of the trainer's protocol: the trainer finds its states with forward hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from koopman_search.trainer.config import ModelConfig


class MoELayer(nn.Module):
    def __init__(self, d_model: int, n_experts: int = 2) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, n_experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model))
            for _ in range(n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.gate(x).argmax(-1, keepdim=True)  # (B, T, 1) top-1 routing
        out = torch.stack([e(x) for e in self.experts], -1)  # (B, T, d, E)
        return out.gather(-1, choice.unsqueeze(-2).expand(*x.shape, 1)).squeeze(-1)


class NotebookBlock(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(d_model)
        self.layer = MoELayer(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(self.layer_norm(x))


class NotebookLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_seq: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_layers = n_layers
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(n_seq, d_model)
        self.blocks = nn.ModuleList(NotebookBlock(d_model) for _ in range(n_layers))
        self.layer_norm_final = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor, use_koopman: bool = False) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        h = self.token_embedding(x) + self.position_embedding(pos)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.layer_norm_final(h))  # (B, T, vocab): logits only


def build(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    return NotebookLM(vocab_size, cfg.d_model, cfg.n_layers, seq_len)
