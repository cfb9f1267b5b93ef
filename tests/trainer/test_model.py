"""The built-in language model and the user-model protocol (trainer/model.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_search.trainer.config import ModelConfig
from koopman_search.trainer.errors import ConfigError
from koopman_search.trainer.model import Block, TransformerLM, build_model

CFG = ModelConfig(d_model=16, n_layers=3, n_heads=2, dropout=0.0)


def test_forward_returns_logits_and_every_blocks_input_and_output() -> None:
    torch.manual_seed(0)
    model = TransformerLM(CFG, vocab_size=50, seq_len=12)
    idx = torch.randint(0, 50, (4, 12))
    logits, hidden = model(idx)
    assert logits.shape == (4, 12, 50)
    assert len(hidden) == CFG.n_layers + 1
    assert all(h.shape == (4, 12, 16) for h in hidden)
    torch.testing.assert_close(hidden[1], model.blocks[0](hidden[0]))  # block 1 maps hidden[0] to hidden[1]
    torch.testing.assert_close(logits, model.head(model.ln_f(hidden[-1])))


def test_model_is_causal() -> None:
    torch.manual_seed(0)
    model = TransformerLM(CFG, vocab_size=50, seq_len=12).eval()
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_head_is_tied_to_the_token_embedding() -> None:
    model = TransformerLM(CFG, vocab_size=50, seq_len=12)
    assert model.head.weight is model.tok_emb.weight


def test_build_model_without_factory_is_the_builtin_transformer() -> None:
    assert isinstance(build_model(CFG, 50, 12), TransformerLM)


def test_build_model_calls_the_factory_and_checks_the_protocol() -> None:
    from tests.trainer.custom_model import GRULM

    cfg = ModelConfig(d_model=16, n_layers=2, factory="tests.trainer.custom_model:build")
    model = build_model(cfg, 50, 12)
    assert isinstance(model, GRULM)
    logits, hidden = model(torch.randint(0, 50, (3, 12)))
    assert logits.shape == (3, 12, 50) and len(hidden) == 3


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("tests.trainer.custom_model:not_a_module", r"must return a torch\.nn\.Module, but got dict"),
        ("tests.trainer.custom_model:without_d_model", r"positive int attribute d_model, but got d_model=None"),
        ("tests.trainer.custom_model:with_zero_layers", r"positive int attribute n_layers, but got n_layers=0"),
        ("tests.trainer.custom_model:NOT_CALLABLE", r"model\.factory must be callable"),
        ("tests.trainer.custom_model:no_such_function", r"names no attribute 'no_such_function'"),
        ("tests.trainer.no_such_module:build", r"model\.factory cannot be imported.*PYTHONPATH"),
        ("no_such_package.models:build", r"model\.factory cannot be imported"),
    ],
)
def test_factory_that_breaks_the_protocol_is_a_config_error_naming_it(factory: str, message: str) -> None:
    cfg = ModelConfig(d_model=16, n_layers=2, factory=factory)
    with pytest.raises(ConfigError, match=message) as info:
        build_model(cfg, 50, 12)
    assert factory in str(info.value)


def test_gpt2_scaled_init_of_residual_projections() -> None:
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(d_model=64, n_layers=8, n_heads=4), vocab_size=100, seq_len=8)
    block = model.blocks[0]
    assert isinstance(block, Block)
    proj, qkv = block.attn.proj.weight.detach(), block.attn.qkv.weight.detach()
    assert float(proj.std()) == pytest.approx(0.02 / 4, rel=0.1)  # 0.02 / sqrt(2 * 8)
    assert float(qkv.std()) == pytest.approx(0.02, rel=0.1)
    biases = [m.bias.detach() for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    assert biases and all(float(b.abs().sum()) == 0 for b in biases)
