"""The LM loss: a chunked, fused linear + cross-entropy for the LM head, and the plain path for other models.

At the default shapes (4096 tokens per batch, vocabulary 30000) the logits of a batch are 491 MB, and
``F.cross_entropy(head(h))`` writes them, their ``log_softmax``, the zero-filled gradient of the loss and the
gradient of the logits: four passes over half a gigabyte per step, most of a CPU step (docs/speed.md).
:func:`linear_cross_entropy` never builds them. It walks the tokens in chunks, and for each chunk computes the
logits into one reused buffer, turns them into the gradient of the loss in place
(``softmax - one_hot``, scaled), and multiplies that into the gradients of the head's input and weight right
away. The gradients are ready when the forward ends; backward only scales them by the incoming gradient.
This is the scheme of Liger-Kernel's FusedLinearCrossEntropy, in PyTorch operators, so it runs on any device.

Chunking the vocabulary as well (Cut Cross-Entropy) would need the logits twice (once for the log-sum-exp,
once for the gradient): a fourth matmul, which costs more on a CPU than the token chunks' buffer saves.

Models opt in with a method ``lm_head_inputs(idx) -> (features, hidden_states, head_weight)``: the input of a
bias-free linear LM head, the hidden states of the model protocol (trainer/model.py), and the head's weight.
The built-in model has it; any other model is called as ``model(idx) -> (logits, hidden_states)`` and its
loss is ``F.cross_entropy`` of its logits, as before.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CHUNK_BYTES", "chunk_tokens", "linear_cross_entropy", "lm_loss_and_hidden"]

logger = logging.getLogger(__name__)

# Size of the reused logits buffer of one chunk (float32). On CPU, chunks of 256 to 1024 tokens of a 30000-word
# vocabulary (29 to 117 MiB) ran fastest and alike within the noise; 64 tokens and the whole batch (4096) were
# slower (`bench/bench_trainer.py --only chunks`, BENCHMARKS.md). 32 MiB is 279 tokens there. On a GPU a larger
# buffer amortises the kernel launches; not yet measured on one.
CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}


def chunk_tokens(n_tokens: int, vocab: int, device: torch.device, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk: as many as fit in ``chunk_bytes`` of float32 logits, at least 1, at most all."""
    budget = chunk_bytes if chunk_bytes is not None else CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, min(n_tokens, budget // (4 * vocab)))


def _chunk_loss(
    h_c: torch.Tensor, w: torch.Tensor, y_c: torch.Tensor, buf: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Sum of the chunk's token losses; if ``scale`` is given, leave ``scale * dloss/dlogits`` in ``buf``.

    ``h_c``: (n, d) in the compute dtype, ``w``: (V, d), ``y_c``: (n,), ``buf``: (n, V) float32.
    """
    if h_c.dtype == torch.float32:
        torch.mm(h_c, w.t(), out=buf)  # (n, V)
    else:  # bf16 matmul (autocast on CUDA), softmax in float32
        buf.copy_(torch.mm(h_c, w.t()))
    target_logit = buf.gather(1, y_c[:, None])  # (n, 1)
    row_max = buf.amax(dim=1, keepdim=True)  # (n, 1)
    buf.sub_(row_max).exp_()  # exp(z - max)
    sum_exp = buf.sum(dim=1, keepdim=True)  # (n, 1)
    loss = (row_max + sum_exp.log() - target_logit).sum()
    if scale is not None:
        buf.mul_(scale / sum_exp)  # scale * softmax
        rows = torch.arange(buf.size(0), device=buf.device)
        buf[rows, y_c] -= scale  # scale * (softmax - one_hot)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(h @ w.T, y) with the gradients computed in the forward's chunk loop."""

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        w: torch.Tensor,
        y: torch.Tensor,
        mean: bool,
        chunk: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        n, vocab = h.size(0), w.size(0)
        scale = 1.0 / n if mean else 1.0
        hc, wc = h.to(compute_dtype), w.to(compute_dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        buf = torch.empty(min(chunk, n), vocab, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n, chunk):
                h_c, y_c = hc[start : start + chunk], y[start : start + chunk]
                g = buf[: h_c.size(0)]  # (n_c, V): the logits, then the gradient of the loss with respect to them
                total += _chunk_loss(h_c, wc, y_c, g, scale)
                if compute_dtype == torch.float32:
                    torch.mm(g, wc, out=grad_h[start : start + chunk])  # (n_c, d)
                    grad_w.addmm_(g.t(), h_c)  # (V, d)
                else:
                    g16 = g.to(compute_dtype)
                    grad_h[start : start + chunk] = torch.mm(g16, wc)
                    grad_w += torch.mm(g16.t(), h_c).float()
        ctx.save_for_backward(grad_h, grad_w.to(w.dtype))
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def _loss_only(
    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int, compute_dtype: torch.dtype
) -> torch.Tensor:
    n, vocab = h.size(0), w.size(0)
    hc, wc = h.to(compute_dtype), w.to(compute_dtype)
    buf = torch.empty(min(chunk, n), vocab, dtype=torch.float32, device=h.device)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, n, chunk):
            h_c = hc[start : start + chunk]
            total += _chunk_loss(h_c, wc, y[start : start + chunk], buf[: h_c.size(0)], None)
    return total


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    chunk: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, target, reduction=reduction)`` without the logits of the whole batch.

    ``h``: (..., d) float32, ``weight``: (V, d), ``target``: (...) int64 class ids. ``reduction`` is "mean"
    (over every token) or "sum". ``chunk``: tokens per chunk (default :func:`chunk_tokens`). Under CUDA
    autocast the matmuls run in its dtype and the softmax in float32, as ``head(h).float()`` does.
    Backward runs once (the gradients are computed in the forward and handed out, not kept for a second
    backward); no double backward.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, but got reduction={reduction!r}")
    d = h.size(-1)
    if weight.dim() != 2 or weight.size(1) != d or target.shape != h.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy needs h (..., d), weight (V, d) and target (...), but got "
            f"h {tuple(h.shape)}, weight {tuple(weight.shape)}, target {tuple(target.shape)}"
        )
    h2, y = h.reshape(-1, d), target.reshape(-1)
    if chunk is None:
        chunk = chunk_tokens(h2.size(0), weight.size(0), h2.device)
    compute_dtype = torch.float32
    if torch.is_autocast_enabled(h2.device.type):
        compute_dtype = torch.get_autocast_dtype(h2.device.type)
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return cast(torch.Tensor, _LinearCrossEntropy.apply(h2, weight, y, reduction == "mean", chunk, compute_dtype))
    total = _loss_only(h2, weight, y, chunk, compute_dtype)
    return total / y.numel() if reduction == "mean" else total


def lm_loss_and_hidden(
    model: nn.Module, idx: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The LM loss of ``model`` on a batch, token-weighted (``reduction`` "mean" or "sum" over every token),
    and the model's hidden states. Fused (:func:`linear_cross_entropy`) for a model with ``lm_head_inputs``,
    ``F.cross_entropy`` of the logits otherwise."""
    head_inputs = getattr(model, "lm_head_inputs", None)
    if callable(head_inputs):
        features, hidden, weight = head_inputs(idx)
        return linear_cross_entropy(features, weight, target, reduction), hidden
    logits, hidden = model(idx)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), target.reshape(-1), reduction=reduction)
    return loss, hidden
