"""A user model plugged in with ``model.factory = "tests.trainer.custom_model:build"``.

A GRU language model that follows the protocol in trainer/model.py: ``d_model`` and ``n_layers`` attributes,
and ``forward(idx) -> (logits, hidden_states)`` with the input of block 1 followed by every block's output.
The other factories here break the protocol on purpose.
"""

from __future__ import annotations

import torch
from torch import nn

from koopman_search.trainer.config import ModelConfig


class GRUBlock(nn.Module):
    """Pre-LayerNorm residual GRU block: x + GRU(ln(x))."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.gru = nn.GRU(d_model, d_model, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.ln(x))  # (B, T, d)
        return x + out


class GRULM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.n_layers = cfg.n_layers
        self.emb = nn.Embedding(vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(GRUBlock(cfg.d_model) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.emb(idx)  # (B, T, d)
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return self.head(self.ln_f(x)), hidden  # (B, T, vocab), n_layers + 1 × (B, T, d)


def build(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    return GRULM(cfg, vocab_size)


def not_a_module(cfg: ModelConfig, vocab_size: int, seq_len: int) -> object:
    return {"d_model": cfg.d_model, "n_layers": cfg.n_layers}


def without_d_model(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    model = GRULM(cfg, vocab_size)
    del model.d_model
    return model


def with_zero_layers(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    model = GRULM(cfg, vocab_size)
    model.n_layers = 0
    return model


NOT_CALLABLE = 42
