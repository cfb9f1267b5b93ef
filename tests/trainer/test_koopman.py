"""Koopman heads: the streamed ridge fit against a dense solve, the loss, the NRE metric (trainer/koopman.py)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import KoopmanConfig
from trainer.koopman import KoopmanHeads, NREAccumulator, ridge_solve

F64 = torch.float64


def make_heads(fit: str = "lstsq", dim: int = 6, n_layers: int = 2, d_model: int = 4, **kw: object) -> KoopmanHeads:
    return KoopmanHeads(KoopmanConfig(dim=dim, fit=fit, **kw), d_model, n_layers, seed=0)  # type: ignore[arg-type]


def dense_ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """The oracle: K from the augmented least-squares system [X; √lam I] Kᵀ = [Y; 0], one block, float64."""
    k = x.shape[1]
    a = torch.cat((x, math.sqrt(lam) * torch.eye(k, dtype=F64)))  # (N + k, k)
    b = torch.cat((y, torch.zeros(k, k, dtype=F64)))  # (N + k, k)
    return torch.linalg.lstsq(a, b).solution.T  # K, with y ≈ K x for column vectors


def random_pairs(n_layers: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_layers, n, k, generator=g, dtype=F64)
    a = torch.randn(n_layers, k, k, generator=g, dtype=F64) / math.sqrt(k)
    y = torch.bmm(x, a) + 0.3 * torch.randn(n_layers, n, k, generator=g, dtype=F64)
    return x, y


# ----------------------------------------------------------------------------------------------- ridge fit


def test_ridge_solve_matches_dense_lstsq_on_the_augmented_system() -> None:
    x, y = random_pairs(3, 200, 6, seed=1)
    lams = torch.tensor([1e-3, 0.5, 20.0], dtype=F64)
    cxx = x.transpose(1, 2) @ x  # Σ x xᵀ
    cyx = y.transpose(1, 2) @ x  # Σ y xᵀ
    k_fit = ridge_solve(cxx, cyx, lams)
    for block, lam in enumerate(lams.tolist()):
        torch.testing.assert_close(k_fit[block], dense_ridge(x[block], y[block], lam), rtol=1e-10, atol=1e-12)


def test_streamed_refit_matches_dense_lstsq_over_all_accumulated_tokens() -> None:
    heads = make_heads(dim=6, ridge=1e-2).double()
    x, y = random_pairs(2, 88, 6, seed=2)
    start = 0
    for size in (7, 50, 1, 30):  # uneven chunks, as the batches of an update interval
        heads.accumulate(x[:, start : start + size], y[:, start : start + size])
        start += size
    assert int(heads.count) == 88
    assert heads.refit()
    for block in range(2):
        lam = 1e-2 * float(torch.trace(x[block].T @ x[block])) / 6  # the ridge is relative to the mean energy
        k_fit = heads.kt[block].T  # kt stores Kᵀ
        torch.testing.assert_close(k_fit, dense_ridge(x[block], y[block], lam), rtol=1e-10, atol=1e-12)


def test_refit_uses_every_token_not_one_averaged_pair_per_batch() -> None:
    # Three batches in a 16-dimensional space: the notebook's refit (docs/design.md) averaged each batch into
    # one state pair, so its pseudo-inverse saw rank 3 and could not recover K. The streamed moments hold every
    # token: rank 16.
    k, batches = 16, 3
    g = torch.Generator().manual_seed(3)
    k_true = torch.randn(k, k, generator=g, dtype=F64) / math.sqrt(k)
    heads = make_heads(dim=k, n_layers=1, ridge=1e-12).double()
    xs = [torch.randn(1, 40, k, generator=g, dtype=F64) for _ in range(batches)]
    for x in xs:
        heads.accumulate(x, x @ k_true.T)  # noiseless y = K x
    assert int(torch.linalg.matrix_rank(heads.cxx[0])) == k > batches
    assert heads.refit()
    torch.testing.assert_close(heads.kt[0].T, k_true, rtol=1e-7, atol=1e-8)

    # the notebook's estimate from the three averaged pairs is far off
    xbar = torch.stack([x[0].mean(0) for x in xs])  # (3, k)
    k_seed = (xbar @ k_true.T).T @ torch.linalg.pinv(xbar.T)
    assert float((k_seed - k_true).norm() / k_true.norm()) > 0.5


def test_refit_resets_the_moments_and_a_refit_without_tokens_keeps_k() -> None:
    heads = make_heads().double()
    x, y = random_pairs(2, 30, 6, seed=4)
    heads.accumulate(x, y)
    assert heads.refit()
    assert float(heads.cxx.abs().sum()) == 0.0 and float(heads.cyx.abs().sum()) == 0.0
    assert int(heads.count) == 0
    kt = heads.kt.clone()
    assert heads.refit() is False
    assert torch.equal(heads.kt, kt)


def test_refit_of_non_finite_moments_keeps_k_and_logs_the_failure(caplog: pytest.LogCaptureFixture) -> None:
    heads = make_heads()
    x, y = random_pairs(2, 30, 6, seed=5)
    x[0, 3, 2] = math.nan
    kt = heads.kt.clone()
    heads.accumulate(x.float(), y.float())
    with caplog.at_level(logging.WARNING, logger="trainer.koopman"):
        assert heads.refit() is False
    assert torch.equal(heads.kt, kt)
    assert heads.refit_errors == 1
    assert "keeping the previous K" in caplog.text
    assert int(heads.count) == 0  # the poisoned moments are dropped, the next window starts clean


def test_float32_moments_agree_with_the_float64_fit() -> None:
    x, y = random_pairs(2, 500, 6, seed=6)
    h32, h64 = make_heads(), make_heads().double()
    h32.accumulate(x.float(), y.float())
    h64.accumulate(x, y)
    assert h32.refit() and h64.refit()
    torch.testing.assert_close(h32.kt.double(), h64.kt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fit", ["gradient", "lstsq"])
def test_k_has_exactly_one_owner(fit: str) -> None:
    heads = make_heads(fit=fit)
    trained = {name for name, _ in heads.named_parameters()}
    buffers = {name for name, _ in heads.named_buffers()}
    if fit == "gradient":
        assert "kt" in trained and "cxx" not in buffers
    else:
        assert "kt" not in trained and {"kt", "cxx", "cyx", "count"} <= buffers


# ----------------------------------------------------------------------------------------------- heads


def test_creating_heads_leaves_the_global_rng_untouched() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make_heads(dim=32, n_layers=4)
    assert torch.equal(torch.rand(3), expected)


def test_heads_start_with_k_the_identity_and_depend_on_the_seed() -> None:
    a, b = make_heads(fit="gradient"), make_heads(fit="gradient")
    assert torch.equal(a.kt, torch.eye(6).repeat(2, 1, 1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    other = KoopmanHeads(KoopmanConfig(dim=6), 4, 2, seed=1)
    assert not torch.equal(a.w1, other.w1)


@pytest.mark.parametrize("lifting", ["mlp", "layernorm"])
def test_lift_pairs_applies_each_blocks_phi_to_its_input_and_output(lifting: str) -> None:
    heads = make_heads(dim=5, n_layers=3, d_model=4, lifting=lifting)
    g = torch.Generator().manual_seed(7)
    hidden = [torch.randn(2, 6, 4, generator=g) for _ in range(4)]  # n_layers + 1 states (B, T, d)
    index = torch.tensor([0, 5, 11, 3])
    x_phi, y_phi = heads.lift_pairs(heads.gather(hidden, index))
    assert x_phi.shape == y_phi.shape == (3, 4, 5)
    flat = torch.stack([h.reshape(12, 4)[index] for h in hidden])  # (L+1, N, d)
    torch.testing.assert_close(x_phi, heads.lift(flat[:-1]))  # block l's φ on its input hidden[l-1] ...
    torch.testing.assert_close(y_phi, heads.lift(flat[1:]))  # ... and on its output hidden[l]
    all_x, _ = heads.lift_pairs(heads.gather(hidden, None))
    assert all_x.shape == (3, 12, 5)


@pytest.mark.parametrize(("kind", "fn"), [("smooth_l1", F.smooth_l1_loss), ("mse", F.mse_loss)])
def test_loss_compares_k_phi_in_with_phi_out(kind: str, fn: object) -> None:
    heads = make_heads(fit="gradient", loss=kind)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(2, 10, 6, generator=g), 3 * torch.randn(2, 10, 6, generator=g)
    with torch.no_grad():
        heads.kt.copy_(torch.randn(2, 6, 6, generator=g))
    expected = fn(torch.bmm(x, heads.kt), y)  # type: ignore[operator]
    torch.testing.assert_close(heads.loss(x, y), expected)
    assert float(heads.loss(x, torch.bmm(x, heads.kt)).detach()) == 0.0


# ----------------------------------------------------------------------------------------------- NRE


def direct_nre(x: torch.Tensor, y: torch.Tensor, kt: torch.Tensor) -> float:
    """1 − R² of K on centred data, straight from the definition, mean over blocks."""
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    num = ((yc - torch.bmm(xc, kt)) ** 2).sum((1, 2))
    den = (yc**2).sum((1, 2))
    return float((num / den).mean())


def streamed_nre(x: torch.Tensor, y: torch.Tensor, kt: torch.Tensor, chunk: int) -> float:
    acc = NREAccumulator()
    for start in range(0, x.shape[1], chunk):
        xs, ys = x[:, start : start + chunk], y[:, start : start + chunk]
        acc.update(torch.bmm(xs, kt) - ys, ys)  # as the trainer calls it
    return acc.value()


def nre_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = random_pairs(3, 120, 5, seed=seed)
    kt = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=F64) / math.sqrt(5)
    return x + 2.0, y - 1.0, kt  # off-centre data, so the centring matters


def test_nre_streamed_in_chunks_equals_the_direct_centred_computation() -> None:
    x, y, kt = nre_data(9)
    expected = direct_nre(x, y, kt)
    assert streamed_nre(x, y, kt, chunk=17) == pytest.approx(expected, rel=1e-12)
    assert streamed_nre(x, y, kt, chunk=120) == pytest.approx(expected, rel=1e-12)
    uncentred = float(((y - torch.bmm(x, kt)) ** 2).sum((1, 2)).div((y**2).sum((1, 2))).mean())
    assert uncentred != pytest.approx(expected, rel=1e-3)


def test_nre_is_scale_free() -> None:
    x, y, kt = nre_data(10)
    assert streamed_nre(10 * x, 10 * y, kt, chunk=50) == pytest.approx(streamed_nre(x, y, kt, 50), rel=1e-12)


def test_nre_is_zero_for_an_exact_linear_relation_plus_offset() -> None:
    x, _, kt = nre_data(11)
    y = torch.bmm(x, kt) + torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=F64)
    assert streamed_nre(x, y, kt, chunk=40) == pytest.approx(0.0, abs=1e-20)


def test_nre_of_a_useless_k_is_about_one() -> None:
    x, y, _ = nre_data(12)
    assert streamed_nre(x, y, torch.zeros(3, 5, 5, dtype=F64), chunk=40) == pytest.approx(1.0, rel=1e-12)


def test_nre_without_tokens_is_nan() -> None:
    assert math.isnan(NREAccumulator().value())
