"""The language model: token + position embeddings → pre-LayerNorm blocks → LayerNorm → LM head.

The protocol every model follows, the built-in one and any user model plugged in with
``model.factory = "package.module:function"``:

* the factory is called as ``factory(cfg: ModelConfig, vocab_size: int, seq_len: int)`` and returns an
  ``nn.Module``;
* the module has integer attributes ``d_model`` (hidden width) and ``n_layers`` (number of blocks);
* ``forward(idx)`` takes token ids of shape (B, T) and returns ``(logits, hidden_states)``: logits of shape
  (B, T, vocab_size) and a list of ``n_layers + 1`` tensors of shape (B, T, d_model): the input of block 1
  followed by the output of every block. Block ``l``'s input is ``hidden_states[l - 1]`` and its output is
  ``hidden_states[l]``; the Koopman loss asks ``φ(output) ≈ K φ(input)`` for each block.

A model written without that protocol (one that returns only logits, as the notebook's did) plugs in as it
is with ``model.blocks_attr = "blocks"``: the attribute that holds its blocks as an ``nn.ModuleList``. Each
block's input and output are then captured with forward hooks (:class:`HookedBlocks`). Either way, a model
whose blocks can be found (:func:`model_blocks`) also gets the Koopman-forward metric, in which every block
is replaced by ψ ∘ K ∘ φ.

Optionally, ``lm_head_inputs(idx)`` returns ``(features, hidden_states, head_weight)`` for a model whose logits
are ``features @ head_weight.T``: the trainer then computes the LM loss without building the logits
(trainer/lm_loss.py). The built-in model has it.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from koopman_search.trainer.config import ModelConfig
from koopman_search.trainer.errors import ConfigError

__all__ = [
    "Block",
    "CausalSelfAttention",
    "HiddenStateModel",
    "HookedBlocks",
    "TransformerLM",
    "build_model",
    "model_blocks",
]

logger = logging.getLogger(__name__)


@runtime_checkable
class HiddenStateModel(Protocol):
    d_model: int
    n_layers: int

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, C/H)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.n_layers = cfg.n_layers
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as in nanoGPT
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def lm_head_inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The LM head's input ln_f(x) (B, T, d), the hidden states, and the head's weight (vocab, d)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, d)
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return self.ln_f(x), hidden, self.head.weight

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features, hidden, _ = self.lm_head_inputs(idx)
        return self.head(features), hidden  # (B, T, vocab)


class HookedBlocks(nn.Module):
    """Wraps a model that returns logits (or a tuple led by logits) so that it follows the protocol: forward
    hooks on its blocks capture every block's input and output."""

    def __init__(self, inner: nn.Module, blocks: nn.ModuleList, d_model: int) -> None:
        super().__init__()
        self.inner = inner
        self.d_model = d_model
        self.n_layers = len(blocks)
        self._blocks = [blocks]  # a list, so the blocks are not registered twice as submodules
        self._seen: list[torch.Tensor] = []
        for block in blocks:
            block.register_forward_hook(self._capture)

    @property
    def blocks(self) -> nn.ModuleList:
        return self._blocks[0]

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self._seen:
            self._seen.append(inputs[0])
        self._seen.append(output)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._seen = []
        out = self.inner(idx)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        hidden, self._seen = self._seen, []
        if len(hidden) != self.n_layers + 1:
            raise RuntimeError(
                f"the model's forward ran {len(hidden) - 1} of its {self.n_layers} blocks "
                "(model.blocks_attr must name blocks that forward calls once each, in order)"
            )
        return logits, hidden


def model_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's blocks, in order, where they can be found: a ``blocks`` ``nn.ModuleList`` with one entry per
    layer (the built-in model, :class:`HookedBlocks`, and protocol models written that way); else None."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) == getattr(model, "n_layers", -1):
        return blocks
    return None


def _load_factory(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"model.factory cannot be imported, but got factory={spec!r} ({exc}); "
            "make the module importable (installed or on PYTHONPATH)"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.factory names no attribute {part!r}, but got factory={spec!r}")
        obj = getattr(obj, part)
    return obj


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    """Build the built-in model, or the user's model when ``cfg.factory`` is set; check the protocol."""
    if not cfg.factory:
        return TransformerLM(cfg, vocab_size, seq_len)
    factory = _load_factory(cfg.factory)
    if not callable(factory):
        raise ConfigError(f"model.factory must be callable, but got factory={cfg.factory!r}")
    model = factory(cfg, vocab_size, seq_len)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.factory must return a torch.nn.Module, but got {type(model).__name__} from factory={cfg.factory!r}"
        )
    if cfg.blocks_attr:
        return _hooked(model, cfg)
    for attr in ("d_model", "n_layers"):
        value = getattr(model, attr, None)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(
                f"a model from model.factory must have a positive int attribute {attr}, but got "
                f"{attr}={value!r} from factory={cfg.factory!r} (see trainer.model's protocol)"
            )
    return model


def _hooked(model: nn.Module, cfg: ModelConfig) -> HookedBlocks:
    obj: object = model
    for part in cfg.blocks_attr.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
        raise ConfigError(
            f"model.blocks_attr must name a non-empty torch.nn.ModuleList of the model's blocks, but got "
            f"blocks_attr={cfg.blocks_attr!r} ({type(obj).__name__}) from factory={cfg.factory!r}"
        )
    d_model = getattr(model, "d_model", cfg.d_model)
    if not isinstance(d_model, int) or d_model <= 0:
        raise ConfigError(
            f"a model from model.factory must have a positive int attribute d_model, but got "
            f"d_model={d_model!r} from factory={cfg.factory!r}"
        )
    return HookedBlocks(model, obj, d_model)
