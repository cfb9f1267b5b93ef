"""The ResNet-BK example model (examples/resnet_bk/): its BK-core, and the model plugged in unchanged through
``model.factory`` and ``model.blocks_attr``: training, shared warmup and resume give the records of an
uninterrupted run, and its study file runs a short study to the end."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch

from examples.resnet_bk.model import ResNetBK, resolvent_diagonal
from koopman_search.trainer.config import TrainerConfig
from koopman_search.trainer.data import Corpus, load_corpus
from koopman_search.trainer.loop import HybridKoopmanTrainer
from tests.search.study_files import cli, status_json
from tests.trainer.tiny import comparable, tiny_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
STUDY = REPO / "examples" / "resnet_bk" / "notebook.toml"
RESNET_BK = {"model.factory": "examples.resnet_bk.model:build", "model.blocks_attr": "blocks"}
# the notebook's Koopman term: smooth-L1 on the latent states, K refitted by streaming DMD (a buffer of 3
# fills within the first Koopman epoch here), the absolute fallback
NOTEBOOK_TERM = {
    "koopman.loss": "smooth_l1",
    "koopman.fit": "dmd",
    "koopman.dmd_buffer": 3,
    "koopman.fallback_mode": "absolute",
    "koopman.fallback_threshold": 10.0,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return load_corpus("builtin", 2000, cache_dir=str(tmp_path_factory.mktemp("token-cache")))


def config(**overrides: Any) -> TrainerConfig:
    return tiny_config({**RESNET_BK, **NOTEBOOK_TERM, "koopman.start_epoch": 1, "train.epochs": 3, **overrides})


def tridiagonal(v: torch.Tensor) -> torch.Tensor:
    n = v.shape[0]
    off = torch.ones(n - 1, dtype=torch.float64)
    return torch.diag(v.double() - 2.0) + torch.diag(off, 1) + torch.diag(off, -1)


@pytest.mark.parametrize("scale", [0.1, 3.0, 50.0])
def test_the_bk_core_is_the_diagonal_of_the_resolvent(scale: float) -> None:
    v = scale * torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    got = resolvent_diagonal(v)
    for b in range(3):
        dense = torch.linalg.inv(tridiagonal(v[b]).to(torch.complex128) - 1j * torch.eye(40, dtype=torch.complex128))
        assert torch.allclose(got[b], torch.diagonal(dense), rtol=1e-10, atol=1e-12)


def test_the_bk_core_differentiates_through_the_potential() -> None:
    v = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: torch.view_as_real(resolvent_diagonal(p)), (v,))


def test_the_model_returns_logits_only_and_routes_one_expert_per_token() -> None:
    model = ResNetBK(vocab_size=50, d_model=8, n_layers=2, seq_len=6).eval()
    out = model(torch.randint(0, 50, (3, 6)))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 6, 50)
    moe = model.blocks[0].moe
    choice = torch.nn.functional.one_hot(moe.gate(torch.randn(4, 8)).argmax(-1), 4)
    assert choice.sum(-1).eq(1).all()


def test_it_trains_through_the_factory_with_the_notebooks_koopman_term(corpus: Corpus) -> None:
    trainer = HybridKoopmanTrainer(config(), corpus)
    first, second, third = trainer.fit()
    assert first.koopman_weight == 0.0 and math.isnan(first.val_koopman_nre)
    for record in (second, third):
        assert record.koopman_loss > 0.0 and math.isfinite(record.koopman_k_norm)
        assert math.isfinite(record.phi_scale) and record.phi_scale > 0.0
        assert math.isfinite(record.val_linear_nre) and math.isfinite(record.val_ppl)
    assert third.lm_loss < first.lm_loss


def test_shared_warmup_and_resume_give_the_uninterrupted_records(corpus: Corpus, tmp_path: Path) -> None:
    cfg = config(**{"koopman.start_epoch": 2})
    baseline_dir, trial_dir = tmp_path / "baseline", tmp_path / "trial"
    HybridKoopmanTrainer(cfg.without_koopman(), corpus).fit(checkpoint_dir=baseline_dir)
    scratch = HybridKoopmanTrainer(cfg, corpus)
    scratch.fit(checkpoint_dir=trial_dir)
    # the Gumbel routing draws from the global generator: the checkpoints must carry its state
    for epoch in (1, 2):
        warm = HybridKoopmanTrainer(cfg, corpus)
        warm.warm_start_from(baseline_dir / f"epoch_{epoch}.pt")
        warm.fit()
        assert comparable(warm.records) == comparable(scratch.records), f"warm start from epoch {epoch}"
    resumed = HybridKoopmanTrainer.from_checkpoint(trial_dir / "epoch_2.pt", corpus=corpus)
    resumed.fit()
    assert comparable(resumed.records) == comparable(scratch.records)


def test_its_study_file_runs_a_short_study_to_the_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = tomllib.loads(STUDY.read_text())
    assert study["trainer"]["model"]["factory"] == "examples.resnet_bk.model:build"
    assert study["enqueue"][0]["label"] == "notebook run"
    # the shipped file, shrunk: the builtin corpus and a tiny model, 2 trials (the notebook's run and hand-tuned 1)
    study["study"].update(name="resnet-bk-short", n_trials=2)
    study["trainer"]["data"].update(source="builtin", vocab_size=2000, seq_len=16, batch_size=8)
    study["trainer"]["model"].update(d_model=16, n_layers=2)
    study["trainer"]["train"].update(epochs=3, device="cpu", max_steps_per_epoch=4, max_eval_batches=2)
    study["trainer"]["koopman"]["dmd_buffer"] = 3
    study["search"]["koopman_start_epoch"].update(low=1, high=2)
    study["search"]["koopman_dim"]["choices"] = [8, 16]
    study["enqueue"] = study["enqueue"][:2]
    for entry in study["enqueue"]:
        entry.update(koopman_start_epoch=min(entry["koopman_start_epoch"], 2), koopman_dim=16)
    path = tmp_path / "notebook.toml"
    path.write_text(tomli_w.dumps(study))
    monkeypatch.setenv("KOOPMAN_CACHE_DIR", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    code, _, err = cli(capsys, "launch", str(path), "--storage", url)
    assert code == 0, err
    data = status_json(capsys, "resnet-bk-short", url)
    assert data["totals"]["complete"] + data["totals"]["pruned"] == 2, data["totals"]
    assert data["totals"]["fail"] == 0
    assert [t["label"] for t in data["trials"]] == ["notebook run", "hand-tuned 1"]
