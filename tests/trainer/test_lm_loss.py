"""The fused, chunked LM head + cross-entropy (trainer/lm_loss.py) against F.cross_entropy of the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from koopman_search.trainer.config import ModelConfig
from koopman_search.trainer.lm_loss import chunk_tokens, linear_cross_entropy, lm_loss_and_hidden
from koopman_search.trainer.model import TransformerLM
from tests.trainer.custom_model import GRULM

N, D, V = 37, 16, 101  # 37 tokens: no chunk size below divides them


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (0.5 * torch.randn(V, D, generator=g)).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def _reference(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, reduction: str) -> tuple[torch.Tensor, ...]:
    h, w = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), y, reduction=reduction)
    loss.backward()
    assert h.grad is not None and w.grad is not None
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 8, 36, 37, 1000])
def test_loss_and_gradients_equal_cross_entropy_of_the_logits(reduction: str, chunk: int) -> None:
    h, w, y = _inputs()
    loss = linear_cross_entropy(h, w, y, reduction=reduction, chunk=chunk)
    loss.backward()
    ref_loss, ref_h, ref_w = _reference(h, w, y, reduction)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert h.grad is not None and w.grad is not None
    torch.testing.assert_close(h.grad.double(), ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_the_incoming_gradient_scales_both_gradients() -> None:
    h, w, y = _inputs(1)
    (3.0 * linear_cross_entropy(h, w, y, chunk=8) + h.sum()).backward()
    _, ref_h, ref_w = _reference(h, w, y, "mean")
    assert h.grad is not None and w.grad is not None
    torch.testing.assert_close(h.grad.double(), 3.0 * ref_h + 1.0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 3.0 * ref_w, rtol=1e-5, atol=1e-6)


def test_batched_input_is_token_weighted_over_every_token() -> None:
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(3, 5, D, generator=g), torch.randn(V, D, generator=g)
    y = torch.randint(0, V, (3, 5), generator=g)
    expected = F.cross_entropy((h @ w.t()).view(-1, V), y.view(-1))
    torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=4), expected)


def test_without_gradients_the_loss_is_the_same_and_nothing_is_kept_for_backward() -> None:
    h, w, y = _inputs(3)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, reduction="sum", chunk=5)
    assert not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss.double(), _reference(h, w, y, "sum")[0], rtol=1e-5, atol=1e-5)


def test_backward_keeps_the_gradients_not_the_logits() -> None:
    h, w, y = _inputs(4)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(h, w, y, chunk=8)
    assert sorted(saved) == sorted([N * D, V * D])  # grad_h and grad_w; no (N, V) logits


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_the_softmax_in_float32() -> None:
    """The CUDA autocast path, run on CPU: close to the reference under the same autocast."""
    h, w, y = _inputs(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, chunk=8)
        ref = F.cross_entropy(F.linear(h, w).float(), y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    loss.backward()
    _, ref_h, ref_w = _reference(h, w, y, "mean")
    assert h.grad is not None and w.grad is not None and h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(h.grad.double(), ref_h, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(w.grad.double(), ref_w, rtol=5e-2, atol=5e-3)


def test_bad_arguments_are_value_errors_naming_them() -> None:
    h, w, y = _inputs()
    with pytest.raises(ValueError, match=r"reduction must be mean or sum, but got reduction='none'"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match=r"but got h \(37, 16\), weight \(101, 15\)"):
        linear_cross_entropy(h, w[:, :15], y)


def test_chunk_tokens_fills_the_byte_budget_and_stays_within_the_batch() -> None:
    cpu = torch.device("cpu")
    assert chunk_tokens(4096, 30000, cpu, chunk_bytes=30000 * 4 * 256) == 256
    assert chunk_tokens(100, 30000, cpu, chunk_bytes=30000 * 4 * 256) == 100
    assert chunk_tokens(4096, 30000, cpu, chunk_bytes=1) == 1
    assert 1 < chunk_tokens(4096, 30000, cpu) < 4096  # the default chunks the user's batch


def test_the_builtin_model_takes_the_fused_path_with_the_plain_loss_and_gradients() -> None:
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, dropout=0.0)
    torch.manual_seed(0)
    model = TransformerLM(cfg, vocab_size=97, seq_len=12)
    idx, y = torch.randint(0, 97, (3, 12)), torch.randint(0, 97, (3, 12))
    logits, hidden_ref = model(idx)
    ref = F.cross_entropy(logits.view(-1, 97), y.view(-1))
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)

    loss, hidden = lm_loss_and_hidden(model, idx, y)
    assert loss.grad_fn is not None and "LinearCrossEntropy" in type(loss.grad_fn).__name__
    torch.testing.assert_close(loss, ref)
    assert all(torch.equal(a, b) for a, b in zip(hidden, hidden_ref, strict=True))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads, strict=True):  # the tied head/embedding weight among them
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_model_that_only_returns_logits_gets_plain_cross_entropy() -> None:
    torch.manual_seed(0)
    model = GRULM(ModelConfig(d_model=16, n_layers=2), vocab_size=50)
    idx, y = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 9))
    loss, hidden = lm_loss_and_hidden(model, idx, y, reduction="sum")
    logits, _ = model(idx)
    assert torch.equal(loss, F.cross_entropy(logits.view(-1, 50), y.view(-1), reduction="sum"))
    assert len(hidden) == 3
