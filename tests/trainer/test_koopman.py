"""Koopman heads: the streamed ridge fit against a dense solve, the losses, the DMD refit and the validation
metrics (trainer/koopman.py)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from koopman_search.trainer.config import KoopmanConfig
from koopman_search.trainer.koopman import KoopmanHeads, KoopmanMetrics, dmd_operator, ridge_solve

F64 = torch.float64


def make_heads(fit: str = "lstsq", dim: int = 6, n_layers: int = 2, d_model: int = 4, **kw: object) -> KoopmanHeads:
    return KoopmanHeads(KoopmanConfig(dim=dim, fit=fit, **kw), d_model, n_layers, seed=0)  # type: ignore[arg-type]


def dense_ridge(x: torch.Tensor, y: torch.Tensor, lam: float, prior: float = 0.0) -> torch.Tensor:
    """The oracle: K from the augmented least-squares system [X; √lam I] Kᵀ = [Y; √lam P], P = prior × I,
    one block, float64 (the minimiser of ‖Y − X Kᵀ‖² + lam ‖K − P‖²)."""
    k = x.shape[1]
    eye = torch.eye(k, dtype=F64)
    a = torch.cat((x, math.sqrt(lam) * eye))  # (N + k, k)
    b = torch.cat((y, math.sqrt(lam) * prior * eye))  # (N + k, k)
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
    x, y = x + 1.5, y - 0.7  # off-centre: the fit must centre, and the offset c absorb the means
    start = 0
    for size in (7, 50, 1, 30):  # uneven chunks, as the batches of an update interval
        heads.accumulate(x[:, start : start + size], y[:, start : start + size])
        start += size
    assert int(heads.count) == 88
    assert heads.refit()
    for block in range(2):
        xc, yc = x[block] - x[block].mean(0), y[block] - y[block].mean(0)
        lam = 1e-2 * float(torch.trace(xc.T @ xc)) / 6  # relative to the mean eigenvalue of the centred moments
        k_fit = heads.kt[block].T  # kt stores Kᵀ
        # centred data, shrunk toward the identity
        k_ref = dense_ridge(xc, yc, lam, prior=1.0)
        torch.testing.assert_close(k_fit, k_ref, rtol=1e-10, atol=1e-12)
        c_ref = y[block].mean(0) - k_ref @ x[block].mean(0)
        torch.testing.assert_close(heads.kb[block, 0], c_ref, rtol=1e-10, atol=1e-12)


def test_ridge_strength_does_not_change_with_the_koopman_dim() -> None:
    # the same latent statistics per dimension in k = 8 and k = 16: the same shrinkage of the same block of K
    g = torch.Generator().manual_seed(21)
    x16 = torch.randn(1, 400, 16, generator=g, dtype=F64)
    a16 = torch.block_diag(*(0.5 * torch.eye(8, dtype=F64),) * 2)
    y16 = x16 @ a16.T + 0.1 * torch.randn(1, 400, 16, generator=g, dtype=F64)
    fits = []
    for k in (8, 16):
        heads = make_heads(dim=k, n_layers=1, ridge=0.5).double()
        heads.accumulate(x16[..., :k], y16[..., :k])
        assert heads.refit()
        fits.append(heads.kt[0].T)
    diag8, diag16 = torch.diagonal(fits[0]).mean(), torch.diagonal(fits[1])[:8].mean()
    assert float(diag8) == pytest.approx(float(diag16), rel=0.05)
    assert 0.5 < float(diag8) < 1.0  # pulled from the true 0.5 toward the identity, not toward 0


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
    assert float(heads.sx.abs().sum()) == 0.0 and float(heads.sy.abs().sum()) == 0.0
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
        assert "kt" in trained and "cxx" not in buffers and "dmd_x" not in buffers
    else:
        assert "kt" not in trained and {"kt", "kb", "cxx", "cyx", "sx", "sy", "count"} <= buffers


def test_dmd_fit_has_two_owners_of_k_as_the_notebook_had() -> None:
    heads = make_heads(fit="dmd", loss="smooth_l1")
    trained = {name for name, _ in heads.named_parameters()}
    buffers = {name for name, _ in heads.named_buffers()}
    assert "kt" in trained and {"dmd_x", "dmd_y", "dmd_pos", "dmd_filled", "kb"} <= buffers


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


def streamed(x: torch.Tensor, y: torch.Tensor, kt: torch.Tensor, chunk: int) -> KoopmanMetrics:
    acc = KoopmanMetrics()
    for start in range(0, x.shape[1], chunk):
        xs, ys = x[:, start : start + chunk], y[:, start : start + chunk]
        acc.update(xs, ys, torch.bmm(xs, kt), ys[..., :4])  # as the trainer calls it (h_out stands in: any (L, N, d))
    return acc


def streamed_nre(x: torch.Tensor, y: torch.Tensor, kt: torch.Tensor, chunk: int) -> float:
    return streamed(x, y, kt, chunk).values()["nre"]


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


def test_phi_scale_is_the_centred_rms_per_coordinate_and_shows_a_shrinking_phi() -> None:
    x, y, kt = nre_data(13)
    yc = y - y.mean(1, keepdim=True)
    expected = yc.pow(2).mean((1, 2)).sqrt().mean()  # per block: RMS over tokens and coordinates, centred
    assert streamed(x, y, kt, chunk=17).values()["scale"] == pytest.approx(float(expected), rel=1e-12)
    # the offset does not count, a shrunk φ does: nre is blind to it, the scale is not
    assert streamed(x, y + 5.0, kt, chunk=40).values()["scale"] == pytest.approx(float(expected), rel=1e-12)
    shrunk = streamed(x / 100, y / 100, kt, chunk=40).values()
    assert shrunk["scale"] == pytest.approx(float(expected) / 100, rel=1e-12)
    assert shrunk["nre"] == pytest.approx(streamed_nre(x, y, kt, 40), rel=1e-9)


def test_nre_without_tokens_is_nan() -> None:
    assert all(math.isnan(v) for v in KoopmanMetrics().values().values())


def participation(z: torch.Tensor) -> float:
    """(Σλ)² / Σλ² of the centred covariance of z (N, m), from its eigenvalues."""
    zc = z - z.mean(0)
    ev = torch.linalg.eigvalsh(zc.T @ zc)
    return float(ev.sum() ** 2 / (ev**2).sum())


def test_gain_and_effective_ranks_equal_their_direct_computations() -> None:
    x, y, kt = nre_data(13)
    acc = streamed(x, y, kt, chunk=23)
    blocks = acc.per_block()
    for b in range(3):
        xc, yc = x[b] - x[b].mean(0), y[b] - y[b].mean(0)
        gain = float(((yc - xc) ** 2).sum() / ((yc - xc @ kt[b]) ** 2).sum())
        assert blocks["gain"][b] == pytest.approx(gain, rel=1e-10)
        assert blocks["effective_rank"][b] == pytest.approx(participation(y[b]), rel=1e-10)
        assert blocks["state_effective_rank"][b] == pytest.approx(participation(y[b, :, :4]), rel=1e-10)
    assert acc.values()["gain"] == pytest.approx(sum(blocks["gain"]) / 3, rel=1e-12)


def test_effective_rank_is_one_for_a_phi_in_one_direction_and_k_for_an_isotropic_one() -> None:
    g = torch.Generator().manual_seed(14)
    t = torch.randn(1, 5000, 1, generator=g, dtype=F64)
    line = t * torch.randn(1, 1, 6, generator=g, dtype=F64) + 3.0  # all variance along one direction
    iso = torch.randn(1, 5000, 6, generator=g, dtype=F64)
    eye = torch.eye(6, dtype=F64).unsqueeze(0)
    assert streamed(line, line, eye, 1000).values()["effective_rank"] == pytest.approx(1.0, rel=1e-9)
    assert streamed(iso, iso, eye, 1000).values()["effective_rank"] == pytest.approx(6.0, rel=0.05)


def test_gain_is_scale_free_so_a_shrunk_phi_scores_no_better() -> None:
    x, y, kt = nre_data(15)
    g1 = streamed(x, y, kt, 50).values()["gain"]
    assert streamed(1e-3 * x, 1e-3 * y, kt, 50).values()["gain"] == pytest.approx(g1, rel=1e-9)


# ----------------------------------------------------------------------------------------------- objectives


def energy(err: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (err**2).sum() / ((target - target.mean(0)) ** 2).sum()


def test_decoder_objective_equals_its_direct_dense_computation() -> None:
    heads = make_heads(fit="gradient", loss="decoder", dim=5, n_layers=2, d_model=3).double()
    g = torch.Generator().manual_seed(16)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)
    states = torch.randn(3, 40, 3, generator=g, dtype=F64) + 1.0  # (L+1, N, d)
    got = heads.objective(states)[0]

    def mlp(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ w1 + b1) @ w2 + b2

    terms = []
    for b in range(2):
        h_in, h_out = states[b], states[b + 1]
        phi = (heads.w1[b], heads.b1[b], heads.w2[b], heads.b2[b])
        psi = (heads.v1[b], heads.c1[b], heads.v2[b], heads.c2[b])  # type: ignore[index]
        z_in, z_out = mlp(h_in, *phi), mlp(h_out, *phi)
        z_pred = z_in @ heads.kt[b] + heads.kb[b]
        rec = 0.5 * (energy(mlp(z_in, *psi) - h_in, h_in) + energy(mlp(z_out, *psi) - h_out, h_out))
        decoder = (rec + energy(mlp(z_pred, *psi) - h_out, h_out) + energy(z_pred - z_out, z_out)) / 3
        # the isotropy gap of φ over inputs and outputs: its covariance over its mean variance, against I
        cov = torch.cov(torch.cat((z_in, z_out)).T)  # (k, k)
        gap = (cov / (cov.trace() / 5) - torch.eye(5, dtype=F64)).pow(2).sum() / 25
        terms.append(decoder + heads.cfg.spread * gap)
    assert heads.cfg.spread == 1.0  # the default
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("loss", "spread"), [("decoder", 0.0), ("decoder", 1.0), ("normalized", 0.0)])
def test_well_posed_objectives_are_blind_to_the_scale_of_phi(loss: str, spread: float) -> None:
    heads = make_heads(fit="gradient", loss=loss, dim=5, n_layers=2, d_model=3, spread=spread).double()
    g = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)
    states = torch.randn(3, 40, 3, generator=g, dtype=F64)
    with torch.no_grad():
        base = float(heads.objective(states)[0])
        heads.w2.mul_(0.01)  # φ shrunk 100×, offset included ...
        heads.b2.mul_(0.01)
        heads.kb.mul_(0.01)
        if heads.v1 is not None:
            heads.v1.mul_(100.0)  # ... and ψ reading it 100× larger: the same maps as before
        shrunk = float(heads.objective(states)[0])
    assert shrunk == pytest.approx(base, rel=1e-9)  # shrinking φ buys nothing, the isotropy term included


def test_isotropy_gap_is_zero_for_white_phi_and_near_one_for_one_direction() -> None:
    from koopman_search.trainer.koopman import _isotropy_gap

    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(400, 8, generator=g, dtype=F64))  # orthonormal columns
    white = (q - q.mean(0)) * 20.0  # centred: still (nearly) orthogonal, equal variances
    assert float(_isotropy_gap(white.unsqueeze(0))[0]) < 0.01
    one = torch.randn(400, 1, generator=g, dtype=F64) * torch.randn(1, 8, generator=g, dtype=F64)
    assert float(_isotropy_gap(one.unsqueeze(0))[0]) == pytest.approx((8 * 7) / 64, rel=0.05)  # k(k−1)/k²


def test_the_notebooks_latent_loss_rewards_shrinking_phi() -> None:
    heads = make_heads(fit="gradient", loss="smooth_l1", dim=5, n_layers=2, d_model=3).double()
    states = torch.randn(3, 40, 3, generator=torch.Generator().manual_seed(17), dtype=F64)
    with torch.no_grad():
        before = float(heads.objective(states)[0])
        heads.w2.mul_(0.01)
        heads.b2.mul_(0.01)
        assert float(heads.objective(states)[0]) < 1e-3 * before


def test_decoder_objective_of_a_constant_phi_is_at_least_the_states_own_spread() -> None:
    heads = make_heads(fit="gradient", loss="decoder", dim=5, n_layers=2, d_model=3).double()
    with torch.no_grad():
        heads.w2.zero_()  # φ = b2 for every state: collapsed to a constant
    states = torch.randn(3, 60, 3, generator=torch.Generator().manual_seed(18), dtype=F64)
    # ψ of a constant is a constant: the best it can do is the mean, i.e. reconstruction error ratio ≥ 1
    assert float(heads.objective(states)[0]) >= 2 / 3 - 1e-9


# ----------------------------------------------------------------------------------------------- dmd


def notebook_dmd(z_cur: torch.Tensor, z_next: torch.Tensor, rcond: float) -> torch.Tensor:
    """The notebook's K = Z_next Z_cur⁺ through torch.linalg.pinv (an independent route to the same estimate)."""
    return z_next @ torch.linalg.pinv(z_cur, rtol=rcond)


def test_dmd_operator_matches_the_pseudo_inverse_and_reports_the_rank() -> None:
    g = torch.Generator().manual_seed(19)
    z = torch.randn(2, 8, 5, generator=g, dtype=F64) @ torch.randn(2, 5, 12, generator=g, dtype=F64)  # rank 5
    zn = torch.randn(2, 8, 12, generator=g, dtype=F64)
    k, rank = dmd_operator(z, zn, 1e-6)
    assert rank.tolist() == [5, 5]
    for b in range(2):
        torch.testing.assert_close(k[b], notebook_dmd(z[b], zn[b], 1e-6), rtol=1e-8, atol=1e-10)


def test_dmd_update_fills_a_circular_buffer_of_batch_means_then_pulls_k_with_alpha() -> None:
    heads = make_heads(fit="dmd", loss="smooth_l1", dim=6, n_layers=2, d_model=4, dmd_buffer=3, dmd_alpha=0.1).double()
    g = torch.Generator().manual_seed(20)
    batches = [torch.randn(3, 10, 4, generator=g, dtype=F64) for _ in range(5)]
    k0 = heads.kt.detach().clone()
    pairs = []
    for i, states in enumerate(batches):
        with torch.no_grad():
            x, y = heads.lift_pairs(states)
        pairs.append((x.mean(1), y.mean(1)))  # the batch-mean pair, one per block
        updated = heads.dmd_update(states)
        assert updated == (i >= 2)  # the first refit when the buffer of 3 has been filled
        if i == 2:
            zc = torch.stack([p[0] for p in pairs], -1)  # (L, k, 3)
            zn = torch.stack([p[1] for p in pairs], -1)
            for b in range(2):
                expect = 0.9 * k0[b].T + 0.1 * notebook_dmd(zc[b], zn[b], 1e-6)
                torch.testing.assert_close(heads.kt[b].T, expect, rtol=1e-8, atol=1e-10)
            assert heads.last_dmd_rank is not None and heads.last_dmd_rank.tolist() == [3, 3]  # rank ≤ buffer
    assert int(heads.dmd_pos) == 5 % 3  # the cursor wrapped: entries 3 and 4 overwrote 0 and 1
    torch.testing.assert_close(heads.dmd_x[:, :, 0], pairs[3][0])
    torch.testing.assert_close(heads.dmd_x[:, :, 2], pairs[2][0])
