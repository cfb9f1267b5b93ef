"""HybridKoopmanTrainer: records, fallback and NaN handling, resume, shared warmup, warm start (trainer/loop.py).

Every run is tiny (see tiny.TINY): the equality tests compare whole records, bit for bit, except the
wall-clock fields.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from koopman_search.trainer.config import TrainerConfig, with_overrides
from koopman_search.trainer.data import Corpus, load_corpus
from koopman_search.trainer.errors import CheckpointError
from koopman_search.trainer.koopman import KoopmanHeads
from koopman_search.trainer.loop import HybridKoopmanTrainer
from koopman_search.trainer.records import EpochRecord
from tests.trainer.tiny import comparable, tiny_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return load_corpus("builtin", 2000, cache_dir=str(tmp_path_factory.mktemp("token-cache")))


def run(cfg: TrainerConfig, corpus: Corpus, checkpoint_dir: Path | None = None) -> HybridKoopmanTrainer:
    trainer = HybridKoopmanTrainer(cfg, corpus)
    trainer.fit(checkpoint_dir=checkpoint_dir)
    return trainer


def all_finite(trainer: HybridKoopmanTrainer) -> bool:
    tensors: list[torch.Tensor] = [*trainer.model.parameters()]
    if trainer.koopman is not None:
        tensors += [*trainer.koopman.parameters(), trainer.koopman.kt]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------- records


def test_records_show_warmup_then_the_koopman_epochs(corpus: Corpus) -> None:
    trainer = run(tiny_config({"koopman.start_epoch": 1, "train.epochs": 3}), corpus)
    first, second, third = trainer.records
    assert [r.epoch for r in trainer.records] == [1, 2, 3] and trainer.epoch == 3
    assert all(r.epochs == 3 and r.steps == 5 for r in trainer.records)
    assert (first.koopman_loss, first.koopman_weight, first.effective_weight) == (0.0, 0.0, 0.0)
    assert first.total_loss == first.lm_loss
    assert math.isnan(first.val_koopman_nre)  # the Koopman part is not evaluated while it is off
    assert (second.koopman_weight, third.koopman_weight) == (0.25, 0.5)
    for r in (second, third):
        assert r.koopman_loss > 0.0 and 0.0 <= r.val_koopman_nre < 1.0
        assert r.effective_weight == pytest.approx(r.koopman_weight, rel=1e-7)
        assert r.total_loss == pytest.approx(r.lm_loss + r.koopman_weight * r.koopman_loss, rel=1e-6)
    for r in trainer.records:
        assert r.val_ppl == math.exp(r.val_loss)
        assert (r.fallback_batches, r.nonfinite_batches) == (0, 0)
        assert r.seconds > 0 and r.tokens_per_s > 0


def test_on_step_follows_every_step_of_every_epoch(corpus: Corpus) -> None:
    trainer = HybridKoopmanTrainer(tiny_config({"train.epochs": 2}), corpus)
    seen: list[tuple[int, ...]] = []
    trainer.fit(on_step=lambda *at: seen.append(at))
    assert seen == [(epoch, 2, step, 5) for epoch in (1, 2) for step in range(1, 6)]


def test_total_loss_is_lm_loss_plus_weighted_koopman_loss(corpus: Corpus) -> None:
    # a large weight, so that the Koopman share (≈ 1e-5 at initialisation) shows in float32 sums
    cfg = tiny_config(
        {"koopman.weight_max": 1000.0, "koopman.schedule": "step", "koopman.start_epoch": 0, "train.epochs": 1}
    )
    (record,) = run(cfg, corpus).records
    assert record.koopman_weight == record.effective_weight == 1000.0
    assert record.total_loss - record.lm_loss == pytest.approx(1000.0 * record.koopman_loss, rel=1e-3)
    assert record.total_loss - record.lm_loss > 1e-3


def test_baseline_records_have_no_koopman_part(corpus: Corpus) -> None:
    trainer = run(tiny_config({"train.epochs": 2}).without_koopman(), corpus)
    assert trainer.koopman is None
    for r in trainer.records:
        assert (r.koopman_loss, r.koopman_weight, r.effective_weight) == (0.0, 0.0, 0.0)
        assert math.isnan(r.val_koopman_nre)


def test_val_loss_is_token_weighted_over_every_validation_token(corpus: Corpus) -> None:
    # 494 validation windows of 16 tokens in batches of 8: the last batch holds 6 windows
    trainer = HybridKoopmanTrainer(tiny_config({"train.max_eval_batches": 0}), corpus)
    val = trainer.evaluate()
    val_loss, nre = val["val_loss"], val["val_koopman_nre"]
    n = (corpus.valid.numel() - 1) // 16
    assert n % 8 == 6
    windows = corpus.valid[: n * 16 + 1]
    x, y = windows[:-1].view(n, 16), windows[1:].view(n, 16)
    with torch.no_grad():
        logits, _ = trainer.model.eval()(x)
    expected = float(F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum")) / y.numel()
    assert val_loss == pytest.approx(expected, rel=1e-6)
    assert 0.0 <= nre < 1.0
    # its standard error over the batches (clusters of windows): the ratio estimator's, by hand
    per_token = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(n, 16)
    sums = [float(per_token[i : i + 8].sum()) for i in range(0, n, 8)]
    counts = [per_token[i : i + 8].numel() for i in range(0, n, 8)]
    b = len(sums)
    spread = sum((s - expected * c) ** 2 for s, c in zip(sums, counts, strict=True))
    assert val["val_loss_se"] == pytest.approx(math.sqrt(b / (b - 1) * spread) / sum(counts), rel=1e-4)
    assert 0 < val["val_loss_se"] < 0.1 * val_loss


def test_one_validation_batch_has_no_standard_error(corpus: Corpus) -> None:
    val = HybridKoopmanTrainer(tiny_config({"train.max_eval_batches": 1}), corpus).evaluate()
    assert math.isfinite(val["val_loss"]) and math.isnan(val["val_loss_se"])


def test_tiny_fallback_threshold_cuts_every_koopman_batch_and_warns_once_per_epoch(
    corpus: Corpus, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(
        {"koopman.fallback_mode": "absolute", "koopman.fallback_threshold": 1e-12, "koopman.fallback_factor": 0.1}
    )
    with caplog.at_level(logging.WARNING, logger="trainer.loop"):
        trainer = run(cfg, corpus)
    for r in trainer.records[1:]:
        assert r.fallback_batches == r.steps == 5
        assert r.effective_weight == pytest.approx(f32(r.koopman_weight * 0.1), rel=1e-12)
        assert r.total_loss == pytest.approx(r.lm_loss + r.effective_weight * r.koopman_loss, rel=1e-6)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warnings == [
        "epoch 2: Koopman weight cut by the fallback on 5 of 5 batches (threshold 1e-12)",
        "epoch 3: Koopman weight cut by the fallback on 5 of 5 batches (threshold 1e-12)",
    ]


def test_relative_fallback_cuts_at_a_spike_and_the_next_batches_and_warns_once(
    corpus: Corpus, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config({"train.epochs": 2, "train.max_steps_per_epoch": 12, "koopman.fallback_factor": 0.1})
    assert (cfg.koopman.fallback_mode, cfg.koopman.fallback_threshold) == ("relative", 2.0)  # the defaults
    original = KoopmanHeads.objective
    calls = [0]

    def objective(self: KoopmanHeads, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, x, y = original(self, states)
        calls[0] += 1
        return (loss * 50 if calls[0] == 9 else loss), x, y  # the 9th Koopman batch spikes

    monkeypatch.setattr(KoopmanHeads, "objective", objective)
    with caplog.at_level(logging.WARNING, logger="trainer.loop"):
        trainer = run(cfg, corpus)
    record = trainer.records[1]
    assert record.fallback_batches == 4  # batches 9..12: the spike and the rest of the epoch (10 would follow)
    assert record.effective_weight == pytest.approx(record.koopman_weight * (8 + 4 * 0.1) / 12, rel=1e-6)
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warnings == [
        "epoch 2: Koopman weight cut by the fallback on 4 of 12 batches "
        "(threshold 2 standard deviations over the running mean)"
    ]


def nan_on_call(monkeypatch: pytest.MonkeyPatch, call: int, how: str) -> None:
    """Make KoopmanHeads.objective non-finite on its ``call``-th call (1-based)."""
    original = KoopmanHeads.objective
    calls = [0]

    def objective(self: KoopmanHeads, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        calls[0] += 1
        if calls[0] != call:
            return original(self, states)
        if how == "value":  # a NaN whose gradient is harmless
            loss, x, y = original(self, states)
            return loss + math.nan, x, y
        return original(self, states * math.nan)  # NaN from inside: its local derivatives are NaN too

    monkeypatch.setattr(KoopmanHeads, "objective", objective)


@pytest.mark.parametrize("fit", ["gradient", "lstsq"])
@pytest.mark.parametrize("how", ["value", "derivative"])
def test_nan_koopman_loss_in_training_keeps_the_weights_finite_and_is_counted(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fit: str, how: str
) -> None:
    nan_on_call(monkeypatch, call=3, how=how)  # epoch 2 (the first Koopman epoch), step 3
    cfg = tiny_config({"koopman.fit": fit, "koopman.update_interval": 2})
    with caplog.at_level(logging.WARNING, logger="koopman_search.trainer"):
        trainer = run(cfg, corpus)
    _, second, third = trainer.records
    assert all_finite(trainer)
    assert second.nonfinite_batches == 1
    # steps 1-2 at the scheduled weight, the term off from step 3 to the end of the epoch
    assert second.effective_weight == pytest.approx(2 * 0.25 / 5, rel=1e-12)
    assert math.isfinite(second.koopman_loss) and math.isfinite(second.lm_loss)
    assert math.isfinite(second.val_loss) and math.isfinite(second.val_koopman_nre)
    # the next epoch starts with the term on again
    assert (third.nonfinite_batches, third.effective_weight) == (0, pytest.approx(0.5, rel=1e-7))
    assert math.isfinite(third.total_loss) and math.isfinite(third.val_koopman_nre)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1  # once per epoch at most; a NaN batch adds nothing to the lstsq moments either
    assert "Koopman loss non-finite on 1 batch(es), term off for the rest of the epoch" in warnings[0].getMessage()


# ----------------------------------------------------------------------------------------------- determinism


def test_identical_runs_give_identical_records_and_weights(corpus: Corpus) -> None:
    cfg = tiny_config({"model.dropout": 0.1, "train.epochs": 2})
    a, b = run(cfg, corpus), run(cfg, corpus)
    assert comparable(a.records) == comparable(b.records)
    pairs = zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)


def test_different_seeds_give_different_records(corpus: Corpus) -> None:
    a = run(tiny_config({"train.epochs": 1}), corpus)
    b = run(tiny_config({"train.epochs": 1, "train.seed": 1}), corpus)
    assert a.records[0].lm_loss != b.records[0].lm_loss
    assert a.records[0].val_loss != b.records[0].val_loss


KOOPMAN_VARIANTS: list[dict[str, Any]] = [
    {"koopman.dim": 8},
    {"koopman.dim": 16},
    {"koopman.dim": 16, "koopman.lifting": "layernorm", "koopman.loss": "mse"},
    {"koopman.dim": 16, "koopman.fit": "lstsq", "koopman.update_interval": 3, "koopman.tokens_per_batch": 0},
    {"koopman.dim": 8, "koopman.loss": "smooth_l1"},
    {"koopman.dim": 8, "koopman.loss": "normalized", "koopman.fit": "lstsq", "koopman.update_interval": 2},
    {"koopman.dim": 8, "koopman.loss": "smooth_l1", "koopman.fit": "dmd", "koopman.dmd_buffer": 3},
]


def test_initialisation_and_data_order_do_not_depend_on_koopman_settings(corpus: Corpus) -> None:
    def fingerprint(cfg: TrainerConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        trainer = HybridKoopmanTrainer(cfg, corpus)
        batches = [x for x, _ in trainer._train_batches(2)]
        return list(trainer.model.state_dict().values()), batches

    base = tiny_config()
    weights, batches = fingerprint(base.without_koopman())
    for overrides in KOOPMAN_VARIANTS:
        other_weights, other_batches = fingerprint(tiny_config(overrides))
        assert all(torch.equal(p, q) for p, q in zip(weights, other_weights, strict=True))
        assert all(torch.equal(p, q) for p, q in zip(batches, other_batches, strict=True))
    seeded_weights, seeded_batches = fingerprint(tiny_config({"train.seed": 1}))
    assert not torch.equal(weights[0], seeded_weights[0])
    assert not torch.equal(batches[0], seeded_batches[0])


def test_warmup_epochs_are_bit_identical_across_koopman_settings_and_the_baseline(corpus: Corpus) -> None:
    common = {"koopman.start_epoch": 2, "train.epochs": 3, "model.dropout": 0.1}
    baseline = comparable(run(tiny_config(common).without_koopman(), corpus).records)
    for overrides in KOOPMAN_VARIANTS:
        records = comparable(run(tiny_config({**common, **overrides}), corpus).records)
        assert records[:2] == baseline[:2], overrides
        assert records[2]["koopman_weight"] == 0.5
        assert records[2]["lm_loss"] != baseline[2]["lm_loss"]  # the Koopman term did act in epoch 3


# ----------------------------------------------------------------------------------------------- checkpoints


FIT_MODES: list[Mapping[str, Any]] = [
    {"koopman.fit": "gradient"},
    # 5 steps per epoch, a refit every 3: moments are carried over epoch ends, so the checkpoint must hold them
    {"koopman.fit": "lstsq", "koopman.update_interval": 3},
    # a buffer of 3 fills within the first Koopman epoch; its cursor and contents must survive the checkpoint
    {"koopman.fit": "dmd", "koopman.loss": "smooth_l1", "koopman.dmd_buffer": 3},
    {"koopman.fit": "gradient", "koopman.loss": "vicreg"},
]


@pytest.mark.parametrize("fit", FIT_MODES, ids=["gradient", "lstsq", "dmd", "vicreg"])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_records(
    corpus: Corpus, tmp_path: Path, fit: Mapping[str, Any]
) -> None:
    cfg = tiny_config({**fit, "model.dropout": 0.1, "koopman.start_epoch": 1, "train.epochs": 3})
    full = run(cfg, corpus, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "last.pt"]
    assert HybridKoopmanTrainer.read_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    for epoch in (1, 2):
        resumed = HybridKoopmanTrainer.from_checkpoint(tmp_path / f"epoch_{epoch}.pt", corpus=corpus)
        assert resumed.epoch == epoch
        assert comparable(resumed.records) == comparable(full.records[:epoch])
        resumed.fit()
        assert comparable(resumed.records) == comparable(full.records)
        assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), full.model.parameters(), strict=True))


def test_callback_stops_training_and_fit_again_continues(corpus: Corpus, tmp_path: Path) -> None:
    cfg = tiny_config({"train.epochs": 3})
    seen: list[EpochRecord] = []

    def stop_after_first(record: EpochRecord) -> bool:
        seen.append(record)
        return record.epoch == 1

    trainer = HybridKoopmanTrainer(cfg, corpus)
    trainer.fit(callback=stop_after_first, checkpoint_dir=tmp_path)
    assert trainer.stopped and trainer.epoch == 1 and len(trainer.records) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt", "last.pt"]
    trainer.fit(callback=stop_after_first)
    assert not trainer.stopped and trainer.epoch == 3
    assert [r.epoch for r in seen] == [1, 2, 3]
    assert comparable(trainer.records) == comparable(run(cfg, corpus).records)


def test_from_checkpoint_and_warm_start_accept_other_runtime_settings(corpus: Corpus, tmp_path: Path) -> None:
    # where it runs, where the token cache lives and whether a bar is drawn do not change what is computed
    cfg = tiny_config({"train.epochs": 2, "koopman.start_epoch": 1})
    run(cfg.without_koopman(), corpus, checkpoint_dir=tmp_path)
    runtime = {"train.device": "auto", "train.progress": True, "data.cache_dir": str(tmp_path / "cache")}
    other = with_overrides(cfg.without_koopman(), runtime)
    assert HybridKoopmanTrainer.from_checkpoint(tmp_path / "epoch_1.pt", other, corpus).epoch == 1
    trial = HybridKoopmanTrainer(with_overrides(cfg, runtime), corpus)
    trial.warm_start_from(tmp_path / "epoch_1.pt")
    assert trial.epoch == 1


def test_a_checkpoint_resumes_with_the_same_corpus_at_another_path(tmp_path: Path) -> None:
    # a retried trial may resume on another machine, where the same files lie elsewhere
    text = "the cat sat on the mat\nthe dog sat on the log\n" * 120
    for name in ("a", "b"):
        for split in ("train", "valid", "test"):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f"{split}.txt").write_text(text)
    cfg = tiny_config({"data.source": f"files:{tmp_path / 'a'}", "train.epochs": 2})
    trainer = HybridKoopmanTrainer(cfg, None)
    trainer.fit(checkpoint_dir=tmp_path / "ck")
    moved = with_overrides(cfg, {"data.source": f"files:{tmp_path / 'b'}"})
    assert HybridKoopmanTrainer.from_checkpoint(tmp_path / "ck" / "epoch_1.pt", moved).epoch == 1


def test_a_checkpoint_refuses_a_corpus_with_other_content_at_the_same_path(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("the cat sat on the mat\n" * 200)
    cfg = tiny_config({"data.source": f"files:{data}", "train.epochs": 2})
    HybridKoopmanTrainer(cfg, None).fit(checkpoint_dir=tmp_path / "ck")
    (data / "train.txt").write_text("a dog lay on a rug\n" * 200)
    with pytest.raises(CheckpointError, match="trained on another corpus"):
        HybridKoopmanTrainer.from_checkpoint(tmp_path / "ck" / "epoch_1.pt", cfg)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"koopman.dim": 16}, "koopman.dim: 8 != 16"),
        ({"train.epochs": 4}, "train.epochs: 3 != 4"),
        ({"train.seed": 5}, "train.seed: 0 != 5"),
        ({"data.seq_len": 32}, "data.seq_len: 16 != 32"),
    ],
)
def test_from_checkpoint_with_another_config_names_the_differing_key(
    corpus: Corpus, tmp_path: Path, overrides: dict[str, Any], named: str
) -> None:
    cfg = tiny_config({"train.epochs": 3, "train.max_steps_per_epoch": 1})
    trainer = HybridKoopmanTrainer(cfg, corpus)
    path = trainer.save_checkpoint(tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} was made with another config: {named}"):
        HybridKoopmanTrainer.from_checkpoint(path, tiny_config({"train.max_steps_per_epoch": 1, **overrides}), corpus)


def _truncated(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _missing_keys(path: Path, good: Path) -> None:
    torch.save({"format": 1, "config": {}}, path)


CORRUPTIONS: dict[str, Callable[[Path, Path], object]] = {
    "random bytes": lambda path, good: path.write_bytes(bytes(range(256)) * 8),
    "text": lambda path, good: path.write_text("not a checkpoint\n"),
    "empty": lambda path, good: path.write_bytes(b""),
    "truncated": _truncated,
    "foreign dict": lambda path, good: torch.save({"state": 1}, path),
    "missing keys": _missing_keys,
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_a_checkpoint_error_naming_the_file(corpus: Corpus, tmp_path: Path, kind: str) -> None:
    good = HybridKoopmanTrainer(tiny_config(), corpus).save_checkpoint(tmp_path / "good.pt")
    bad = tmp_path / "bad.pt"
    CORRUPTIONS[kind](bad, good)
    with pytest.raises(CheckpointError, match=str(bad)):
        HybridKoopmanTrainer.from_checkpoint(bad, corpus=corpus)


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=rf"checkpoint not found: {tmp_path / 'absent.pt'}"):
        HybridKoopmanTrainer.from_checkpoint(tmp_path / "absent.pt")


# ----------------------------------------------------------------------------------------------- warm start


WARM = {"koopman.start_epoch": 2, "train.epochs": 3, "model.dropout": 0.1}


@pytest.fixture(scope="module")
def baseline_dir(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints of the baseline (Koopman off) of the WARM trials, epochs 1..3."""
    directory = tmp_path_factory.mktemp("baseline")
    run(tiny_config(WARM).without_koopman(), corpus, checkpoint_dir=directory)
    return directory


@pytest.mark.parametrize("fit", FIT_MODES, ids=["gradient", "lstsq", "dmd", "vicreg"])
def test_warm_start_from_the_baseline_gives_the_from_scratch_records(
    corpus: Corpus, baseline_dir: Path, fit: Mapping[str, Any]
) -> None:
    cfg = tiny_config({**WARM, **fit})
    scratch = comparable(run(cfg, corpus).records)
    for epoch in (2, 1):  # at the start epoch, and before it
        trainer = HybridKoopmanTrainer(cfg, corpus)
        trainer.warm_start_from(baseline_dir / f"epoch_{epoch}.pt")
        assert trainer.epoch == epoch and len(trainer.records) == epoch
        trainer.fit()
        assert comparable(trainer.records) == scratch


def test_warm_start_from_a_koopman_checkpoint_is_refused(corpus: Corpus, tmp_path: Path) -> None:
    cfg = tiny_config(WARM)
    trainer = HybridKoopmanTrainer(cfg, corpus)
    path = trainer.save_checkpoint(tmp_path / "trial.pt")
    with pytest.raises(CheckpointError, match=rf"needs a Koopman-off \(baseline\) checkpoint, but {path}"):
        HybridKoopmanTrainer(cfg, corpus).warm_start_from(path)


def test_warm_start_past_the_start_epoch_is_refused(corpus: Corpus, baseline_dir: Path) -> None:
    trainer = HybridKoopmanTrainer(tiny_config(WARM), corpus)
    with pytest.raises(CheckpointError, match=r"warm start from epoch 3 is past koopman\.start_epoch=2"):
        trainer.warm_start_from(baseline_dir / "epoch_3.pt")


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({"train.seed": 1}, "train.seed: 0 != 1"), ({"model.d_model": 32}, "model.d_model: 16 != 32")],
)
def test_warm_start_from_another_config_names_the_differing_key(
    corpus: Corpus, baseline_dir: Path, overrides: dict[str, Any], named: str
) -> None:
    trainer = HybridKoopmanTrainer(tiny_config({**WARM, **overrides}), corpus)
    with pytest.raises(CheckpointError, match=rf"was made with another config: {named}"):
        trainer.warm_start_from(baseline_dir / "epoch_2.pt")


def test_warm_start_after_training_is_refused(corpus: Corpus, baseline_dir: Path) -> None:
    trainer = HybridKoopmanTrainer(tiny_config({**WARM, "train.max_steps_per_epoch": 5}), corpus)
    trainer.fit(callback=lambda record: True)
    with pytest.raises(CheckpointError, match="warm start must come before any training"):
        trainer.warm_start_from(baseline_dir / "epoch_1.pt")


# ----------------------------------------------------------------------------------------------- user model


def test_custom_model_trains_and_reports_val_koopman_nre(corpus: Corpus, tmp_path: Path) -> None:
    cfg = tiny_config({"model.factory": "tests.trainer.custom_model:build", "train.epochs": 2})
    trainer = run(cfg, corpus, checkpoint_dir=tmp_path)
    assert type(trainer.model).__name__ == "GRULM"
    first, second = trainer.records
    assert math.isnan(first.val_koopman_nre)
    assert 0.0 <= second.val_koopman_nre < 1.0 and second.koopman_loss > 0.0
    assert all(math.isfinite(r.lm_loss) and math.isfinite(r.val_ppl) for r in trainer.records)
    resumed = HybridKoopmanTrainer.from_checkpoint(tmp_path / "epoch_1.pt", corpus=corpus)
    resumed.fit()
    assert comparable(resumed.records) == comparable(trainer.records)


def test_checkpoints_are_written_atomically_without_leftovers(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = run(tiny_config({"train.epochs": 2}), corpus, checkpoint_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    before = (tmp_path / "last.pt").read_bytes()

    def save_half_then_fail(obj: object, fh: Any, *args: object, **kwargs: object) -> None:
        fh.write(b"half a checkpoint")  # as a full disk or a killed write leaves it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before  # the old checkpoint is whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # and the partial one is gone


# ----------------------------------------------------------------------------------------------- Koopman metrics


def test_koopman_epochs_record_rank_gain_and_forward_ppl(corpus: Corpus) -> None:
    trainer = run(tiny_config(), corpus)
    first, *koopman = trainer.records
    assert all(
        math.isnan(v)
        for v in (first.phi_effective_rank, first.val_koopman_forward_ppl, first.val_koopman_gain, first.koopman_k_norm)
    )
    for r in koopman:
        assert 1.0 <= r.phi_effective_rank <= 8.0  # between one direction and all k = 8
        assert 1.0 <= r.state_effective_rank <= 16.0
        assert len(r.val_koopman_gain_blocks) == 2
        assert r.val_koopman_gain == pytest.approx(sum(r.val_koopman_gain_blocks) / 2)
        assert math.isfinite(r.val_koopman_forward_ppl) and r.val_koopman_forward_ppl > 1.0
        assert r.koopman_k_norm > 0


def test_notebook_forms_have_no_decoder_and_no_forward_ppl(corpus: Corpus) -> None:
    r = run(tiny_config({"koopman.loss": "smooth_l1", "train.epochs": 2}), corpus).records[-1]
    assert math.isnan(r.val_koopman_forward_ppl) and math.isfinite(r.phi_effective_rank)


def test_forward_ppl_is_the_plain_ppl_when_the_koopman_map_is_the_block_itself(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = HybridKoopmanTrainer(tiny_config(), corpus)
    blocks = trainer.model.blocks  # type: ignore[union-attr]
    # forward(), not __call__: the block's own hooks (which call block_step) stay out of it
    monkeypatch.setattr(KoopmanHeads, "block_step", lambda self, layer, h: blocks[layer].forward(h))
    val = trainer.evaluate()
    assert val["val_koopman_forward_ppl"] == pytest.approx(math.exp(val["val_loss"]), rel=1e-6)


def test_forward_ppl_is_the_plain_ppl_when_psi_k_phi_and_the_blocks_are_identity_maps(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = HybridKoopmanTrainer(tiny_config({"model.dropout": 0.0}), corpus)
    with torch.no_grad():  # every block's residual branches output 0: block(x) = x
        for block in trainer.model.blocks:  # type: ignore[union-attr]
            for lin in (block.attn.proj, block.mlp[2]):
                lin.weight.zero_()
                lin.bias.zero_()
    monkeypatch.setattr(KoopmanHeads, "block_step", lambda self, layer, h: h)
    val = trainer.evaluate()
    assert val["val_koopman_forward_ppl"] == pytest.approx(math.exp(val["val_loss"]), rel=1e-6)
    monkeypatch.undo()  # the real ψ ∘ K ∘ φ of fresh heads is not the identity: another perplexity
    assert trainer.evaluate()["val_koopman_forward_ppl"] != pytest.approx(math.exp(val["val_loss"]), rel=1e-3)


def test_heads_learn_at_their_own_pace_whatever_the_weight(corpus: Corpus) -> None:
    # The weight scales the Koopman gradient into the backbone only. At weights of 1e-4 and 1e-8 the backbone
    # is practically the baseline's in both runs, and the heads train alike; had the heads learnt from the
    # weighted loss, their gradients at 1e-8 would sit far below AdamW's eps = 1e-8 and they would stall.
    def moved(trainer: HybridKoopmanTrainer) -> float:
        """The largest change of a head parameter from its initial value (the same seed's fresh heads)."""
        fresh = HybridKoopmanTrainer(tiny_config(), corpus)
        assert trainer.koopman is not None and fresh.koopman is not None
        now, then = trainer.koopman.state_dict(), fresh.koopman.state_dict()
        return max((now[k].float() - then[k].float()).abs().max().item() for k in now if now[k].is_floating_point())

    def run_at(w: float) -> HybridKoopmanTrainer:
        return run(tiny_config({"koopman.weight_max": w, "koopman.schedule": "step"}), corpus)

    small, tiny = run_at(1e-4), run_at(1e-8)
    baseline = run(tiny_config().without_koopman(), corpus).records
    assert tiny.records[-1].koopman_loss == pytest.approx(small.records[-1].koopman_loss, rel=1e-2)
    assert tiny.records[-1].val_loss == pytest.approx(baseline[-1].val_loss, rel=1e-6)
    # and the heads did move, as far at 1e-8 as at 1e-4 (AdamW steps of about lr each)
    assert moved(tiny) > 1e-2
    assert moved(tiny) == pytest.approx(moved(small), rel=5e-2)


def test_dmd_refit_grows_k_while_the_other_fits_keep_it_near_the_identity(corpus: Corpus) -> None:
    common = {"koopman.loss": "smooth_l1", "train.epochs": 3, "train.max_steps_per_epoch": 12, "koopman.dmd_buffer": 8}
    norms = {
        fit: run(tiny_config({**common, "koopman.fit": fit}), corpus).records[-1].koopman_k_norm
        for fit in ("dmd", "gradient", "lstsq")
    }
    assert norms["dmd"] > 1.5 * max(norms["gradient"], norms["lstsq"]), norms


# ----------------------------------------------------------------------------------------------- models as they are


def test_hooks_capture_the_same_states_as_the_protocol(corpus: Corpus) -> None:
    from koopman_search.trainer.model import HookedBlocks

    trainer = HybridKoopmanTrainer(tiny_config(), corpus)
    model = trainer.model.eval()
    x = corpus.valid[: 4 * 16].view(4, 16)
    with torch.no_grad():
        logits, hidden = model(x)
        hooked_logits, hooked = HookedBlocks(model, model.blocks, 16)(x)  # type: ignore[arg-type]
    assert torch.equal(logits, hooked_logits)
    assert len(hooked) == len(hidden) == 3
    assert all(torch.equal(a, b) for a, b in zip(hidden, hooked, strict=True))


def test_a_notebook_style_model_plugs_in_unchanged_and_resumes_exactly(corpus: Corpus, tmp_path: Path) -> None:
    cfg = tiny_config(
        {"model.factory": "tests.trainer.notebook_model:build", "model.blocks_attr": "blocks", "train.epochs": 2}
    )
    trainer = run(cfg, corpus, checkpoint_dir=tmp_path)
    first, second = trainer.records
    assert math.isnan(first.val_koopman_nre)
    assert 0.0 <= second.val_koopman_nre and second.koopman_loss > 0.0
    assert math.isfinite(second.val_koopman_forward_ppl) and math.isfinite(second.phi_effective_rank)
    resumed = HybridKoopmanTrainer.from_checkpoint(tmp_path / "epoch_1.pt", corpus=corpus)
    resumed.fit()
    assert comparable(resumed.records) == comparable(trainer.records)


@pytest.mark.parametrize(
    ("attr", "match"),
    [("layers", "must name a non-empty torch.nn.ModuleList"), ("lm_head", "must name a non-empty torch.nn.ModuleList")],
)
def test_a_wrong_blocks_attr_names_the_key_and_value(corpus: Corpus, attr: str, match: str) -> None:
    from koopman_search.trainer.errors import ConfigError

    cfg = tiny_config({"model.factory": "tests.trainer.notebook_model:build", "model.blocks_attr": attr})
    with pytest.raises(ConfigError, match=f"{match}.*blocks_attr='{attr}'"):
        HybridKoopmanTrainer(cfg, corpus)


def test_records_hold_ks_spectrum_once_the_koopman_loss_is_on(corpus: Corpus) -> None:
    from koopman_search.trainer.records import K_EIGS_PER_BLOCK

    trainer = run(tiny_config({"koopman.start_epoch": 1, "train.epochs": 2, "koopman.dim": 12}), corpus)
    off, on = trainer.records
    assert math.isnan(off.koopman_k_radius) and off.koopman_k_eig_re == [] == off.koopman_k_eig_im
    assert trainer.koopman is not None
    eig = torch.linalg.eigvals(trainer.koopman.kt.double())  # (blocks, k)
    assert on.koopman_k_radius == pytest.approx(float(eig.abs().amax(-1).mean()), rel=1e-9)
    assert len(on.koopman_k_eig_re) == len(on.koopman_k_eig_im) == 2 * K_EIGS_PER_BLOCK
    for block in range(2):
        kept = on.koopman_k_eig_re[block * K_EIGS_PER_BLOCK : (block + 1) * K_EIGS_PER_BLOCK]
        im = on.koopman_k_eig_im[block * K_EIGS_PER_BLOCK : (block + 1) * K_EIGS_PER_BLOCK]
        moduli = sorted((abs(complex(r, i)) for r, i in zip(kept, im, strict=True)), reverse=True)
        largest = sorted(eig[block].abs().tolist(), reverse=True)[:K_EIGS_PER_BLOCK]
        assert moduli == pytest.approx(largest, rel=1e-9)  # the largest in modulus, the radius first
