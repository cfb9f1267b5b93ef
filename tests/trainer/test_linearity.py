"""The linearity measure (trainer/linearity.py): fresh closed-form heads on a frozen backbone.

Checked against a dense least-squares oracle on toy blocks that are exactly linear and that are not, for
independence from the trial's own heads, and for the collapse measure read beside it on a live run.
"""

from __future__ import annotations

import math

import pytest
import torch

from koopman_search.trainer.config import with_overrides
from koopman_search.trainer.data import Corpus, load_corpus
from koopman_search.trainer.linearity import FEATURES_PER_WIDTH, LinearScore, dictionary, fit_linear
from koopman_search.trainer.loop import HybridKoopmanTrainer
from tests.trainer.tiny import tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return load_corpus("builtin", 2000, cache_dir=str(tmp_path_factory.mktemp("token-cache")))


def toy_states(block: str, n: int, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_in, h_out) of shape (1, n, d) for a toy residual block."""
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(99), dtype=torch.float64) * 0.3  # the block
    g = torch.Generator().manual_seed(seed)  # the states it sees
    h_in = torch.randn(1, n, d, generator=g, dtype=torch.float64) * 2.0 + 0.5
    if block == "linear":
        h_out = h_in + h_in @ a + 0.1
    else:  # a strongly nonlinear update: no finite dictionary holds it exactly
        h_out = h_in + torch.sign(h_in @ a) * (h_in @ a).abs().sqrt() + torch.cos(3 * h_in)
    return h_in, h_out


def oracle_nre(fit: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The same measure from a dense, unregularised ``torch.linalg.lstsq`` on the same dictionary."""
    (x, y), (xt, yt) = fit, test
    d = x.shape[-1]
    w, b = dictionary(d, x.device)
    mean, std = x[0].mean(0), x[0].std(0)

    def design(h: torch.Tensor) -> torch.Tensor:
        z = (h[0] - mean) / std
        return torch.cat((z, torch.tanh(z @ w + b), torch.ones(len(z), 1, dtype=z.dtype)), dim=1)

    coef = torch.linalg.lstsq(design(x), y[0]).solution
    err = yt[0] - design(xt) @ coef
    delta = yt[0] - xt[0]
    return float(err.pow(2).sum() / (delta - delta.mean(0)).pow(2).sum())


@pytest.mark.parametrize("block", ["linear", "nonlinear"])
def test_linear_nre_matches_a_dense_least_squares_oracle(block: str) -> None:
    fit, test = toy_states(block, 4000, seed=0), toy_states(block, 1000, seed=1)
    score = LinearScore(fit_linear(*fit, ridge=1e-12))
    score.update(*test)
    expected = oracle_nre(fit, test)
    assert score.value() == pytest.approx(expected, rel=1e-4, abs=1e-9)
    if block == "linear":
        assert score.value() < 1e-12  # replaced perfectly
    else:
        assert score.value() > 0.05  # the measure sees what the dictionary cannot hold


def test_linear_nre_is_blind_to_the_states_scale_and_offset() -> None:
    fit, test = toy_states("nonlinear", 3000, seed=2), toy_states("nonlinear", 800, seed=3)
    plain = LinearScore(fit_linear(*fit))
    plain.update(*test)
    moved = LinearScore(fit_linear(fit[0] * 50 + 3, fit[1] * 50 + 3))
    moved.update(test[0] * 50 + 3, test[1] * 50 + 3)
    assert moved.value() == pytest.approx(plain.value(), rel=1e-6)


def test_block_step_is_the_batched_prediction_of_one_block() -> None:
    h_in = torch.cat([toy_states("nonlinear", 500, seed=s)[0] for s in (4, 5)])  # (2, 500, 6)
    h_out = torch.cat([toy_states("nonlinear", 500, seed=s)[1] for s in (4, 5)])
    models = fit_linear(h_in, h_out)
    batched = models.predict(h_in.float())
    for layer in (0, 1):
        one = models.block_step(layer, h_in[layer].float().reshape(10, 50, 6))
        torch.testing.assert_close(one.reshape(500, 6), batched[layer], rtol=1e-5, atol=1e-5)


def test_dictionary_is_one_fixed_draw() -> None:
    w1, b1 = dictionary(8, torch.device("cpu"))
    w2, b2 = dictionary(8, torch.device("cpu"))
    assert w1.shape == (8, FEATURES_PER_WIDTH * 8) and torch.equal(w1, w2) and torch.equal(b1, b2)


def test_the_measure_does_not_depend_on_how_long_the_heads_trained(corpus: Corpus) -> None:
    """Two trials with the same backbone whose heads trained for different numbers of epochs."""
    cfg = tiny_config({"train.epochs": 3, "koopman.start_epoch": 1})
    trained = HybridKoopmanTrainer(cfg, corpus)
    trained.fit()
    fresh = HybridKoopmanTrainer(cfg, corpus)  # same backbone, heads never trained
    fresh.model.load_state_dict(trained.model.state_dict())
    a, b = trained.evaluate(), fresh.evaluate()
    assert a["val_linear_nre"] == b["val_linear_nre"] and a["val_linear_ppl"] == b["val_linear_ppl"]
    assert a["val_linear_nre_blocks"] == b["val_linear_nre_blocks"]
    assert a["val_koopman_forward_ppl"] != b["val_koopman_forward_ppl"]  # what the heads' own metric reads


def test_the_baseline_has_the_measure_and_a_zero_weight_trial_matches_it(corpus: Corpus) -> None:
    base = HybridKoopmanTrainer(tiny_config({"koopman.enabled": False}), corpus)
    zero = HybridKoopmanTrainer(tiny_config({"koopman.weight_max": 0.0}), corpus)
    base_records, zero_records = base.fit(), zero.fit()
    for b, z in zip(base_records, zero_records, strict=True):
        assert math.isfinite(b.val_linear_nre) and 0.0 <= b.val_linear_nre
        assert len(b.val_linear_nre_blocks) == 2
        assert b.val_linear_ppl > 1.0
        assert (b.val_linear_nre, b.val_linear_ppl) == (z.val_linear_nre, z.val_linear_ppl)


def test_the_measure_is_off_at_zero_fit_tokens(corpus: Corpus) -> None:
    trainer = HybridKoopmanTrainer(tiny_config({"train.linear_fit_tokens": 0}), corpus)
    out = trainer.evaluate()
    assert math.isnan(out["val_linear_nre"]) and math.isnan(out["val_linear_ppl"])


# ---- collapse, on a live run -------------------------------------------------------------------------------

# A live run long enough for the heads to settle: builtin corpus, d 32, 2 blocks, k 32, 40 steps of 8 × 32.
LIVE = {
    "data.seq_len": 32,
    "model.d_model": 32,
    "koopman.dim": 32,
    "koopman.tokens_per_batch": 0,
    "train.max_steps_per_epoch": 40,
    "train.max_eval_batches": 4,
    "train.lr": 3e-3,
    "train.linear_fit_tokens": 0,
}
# φ's effective rank over the states' (trainer/koopman.py, KoopmanMetrics; docs/koopman-objective.md,
# "Collapse"). On this run (bench/bench_collapse.py, seeds 0-2, both Koopman epochs) the default objective read
# 0.99-1.48, the plain three-term objective (koopman.spread = 0) 0.51-0.76, and a φ collapsed onto one direction
# 0.17-0.34. The floor lies between the default's range and the plain objective's.
COLLAPSE_FLOOR = 0.9


def test_default_objective_keeps_phi_as_spread_as_the_states_on_a_live_run(corpus: Corpus) -> None:
    cfg = with_overrides(tiny_config(), LIVE)
    assert cfg.koopman.loss == "decoder"
    trainer = HybridKoopmanTrainer(cfg, corpus)
    records = trainer.fit()
    for r in records[1:]:
        assert r.phi_rank_ratio >= COLLAPSE_FLOOR, r
    # the same states through a φ collapsed onto one direction: the measure must see it
    heads = trainer.koopman
    assert heads is not None
    with torch.no_grad():
        direction = torch.randn(1, 1, heads.w2.shape[-1], generator=torch.Generator().manual_seed(0))
        heads.w2.copy_(heads.w2[..., :1] * direction)  # every output coordinate a multiple of one
    collapsed = trainer.evaluate()["phi_rank_ratio"]
    assert collapsed < 0.4 < COLLAPSE_FLOOR


def test_without_the_isotropy_term_phi_is_less_spread_than_the_states(corpus: Corpus) -> None:
    trainer = HybridKoopmanTrainer(with_overrides(tiny_config(), {**LIVE, "koopman.spread": 0.0}), corpus)
    assert max(r.phi_rank_ratio for r in trainer.fit()[1:]) < COLLAPSE_FLOOR
