"""``koopman-search train`` run in process: output formats, resume, and bad input (search/cli/train.py)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from koopman_search.search.cli import main
from koopman_search.trainer.loop import HybridKoopmanTrainer
from koopman_search.trainer.records import RECORD_FIELDS
from tests.trainer.tiny import TIMING_FIELDS

# The smallest run the flags can describe: the builtin corpus, 4 steps of 8 × 16 tokens per epoch.
TINY_FLAGS = [
    "--data", "builtin", "--vocab-size", "2000", "--d-model", "16", "--n-layers", "2", "--koopman-dim", "8",
    "--seq-len", "16", "--batch-size", "8", "--max-steps-per-epoch", "4", "--device", "cpu", "--no-progress",
]  # fmt: skip
LINE = re.compile(
    r"^Epoch (\d+)/(\d+): Train Loss (\d+\.\d{4}) \(LM (\d+\.\d{4}), Koopman (\d+\.\d{4})\) "
    r"weight (\d\.\d{4}) \| val PPL (\d+\.\d{2})( \| NRE \d\.\d{4})?( \| gain [\d.e+-]+)?( \| φ rank \d+\.\d{2})?"
    r"( \| Koopman PPL \d+\.\d{2})?( \| fallback \d+)? \| \d+\.\d s$"
)

Runner = Callable[..., tuple[int, list[str], str]]


@pytest.fixture
def train(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Runner:
    """Run ``koopman-search train ARGS`` in process; return its exit code, stdout lines and stderr.

    Unless a test gives its own --config, a config file sets three validation batches per epoch (no flag
    does)."""
    short_eval = tmp_path / "eval.toml"
    short_eval.write_text("[train]\nmax_eval_batches = 3\n", encoding="utf-8")

    def run(*args: str) -> tuple[int, list[str], str]:
        config = [] if "--config" in args else ["--config", str(short_eval)]
        code = main(["train", *config, *args])
        out, err = capsys.readouterr()
        return code, out.splitlines(), err

    return run


def records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def without_timing(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMING_FIELDS}


def test_prints_one_line_per_epoch_in_the_users_format(train: Runner) -> None:
    code, lines, _ = train(*TINY_FLAGS, "--epochs", "2", "--koopman-start-epoch", "1")
    assert code == 0
    assert len(lines) == 2
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    first, second = (m.groups() for m in matches if m)
    assert first[:2] == ("1", "2") and second[:2] == ("2", "2")
    assert (first[4], first[5], first[7]) == ("0.0000", "0.0000", None)  # warmup: no Koopman, no NRE
    assert second[5] == "0.5000" and second[7] is not None
    assert float(second[2]) >= float(second[3])  # total = LM + weight × Koopman


def test_json_prints_one_object_per_epoch_with_every_record_field(train: Runner) -> None:
    code, lines, _ = train(*TINY_FLAGS, "--epochs", "2", "--koopman-start-epoch", "1", "--json")
    assert code == 0
    first, second = records(lines)
    assert tuple(first) == RECORD_FIELDS
    assert first["val_koopman_nre"] is None  # NaN is written as null: the output stays valid JSON
    assert isinstance(second["val_koopman_nre"], float)
    # every Koopman epoch carries the collapse and usefulness metrics (docs/koopman-objective.md)
    assert first["phi_effective_rank"] is None and first["val_koopman_forward_ppl"] is None
    assert second["phi_effective_rank"] >= 1.0 and second["val_koopman_forward_ppl"] > 1.0
    assert len(second["val_koopman_gain_blocks"]) == 2
    assert second["val_ppl"] == pytest.approx(math.exp(second["val_loss"]))


def test_acceptance_shape_warmup_epoch_then_weight_max_at_the_last_epoch(train: Runner) -> None:
    code, lines, _ = train(
        *TINY_FLAGS, "--epochs", "3", "--koopman-start-epoch", "1", "--koopman-weight-max", "0.2",
        "--schedule", "exponential", "--json",
    )  # fmt: skip
    assert code == 0
    first, second, third = records(lines)
    assert [r["epoch"] for r in (first, second, third)] == [1, 2, 3]
    assert (first["koopman_loss"], first["koopman_weight"]) == (0, 0)
    assert 0 < second["koopman_weight"] < 0.2
    assert third["koopman_weight"] == 0.2
    assert third["koopman_loss"] > 0 and third["steps"] == 4


def test_config_file_is_read_and_flags_override_it(train: Runner, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        '[koopman]\nweight_max = 0.3\nschedule = "step"\n[train]\nepochs = 5\nmax_eval_batches = 3\n',
        encoding="utf-8",
    )
    code, lines, err = train("--config", str(config), *TINY_FLAGS, "--epochs", "2", "--json")
    assert code == 2 and lines == []  # the default start epoch 3 would leave the Koopman loss off throughout
    assert f"koopman.start_epoch=3, train.epochs=2 (command line, {config}, [koopman.start_epoch])" in err
    code, lines, _ = train(
        "--config", str(config), *TINY_FLAGS, "--epochs", "2", "--koopman-start-epoch", "0", "--json"
    )
    assert [r["koopman_weight"] for r in records(lines)] == [0.3, 0.3]


def test_resume_after_an_interrupted_run_continues_at_the_next_epoch(
    train: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*TINY_FLAGS, "--epochs", "3", "--koopman-start-epoch", "1", "--koopman-fit", "lstsq", "--json"]
    code, lines, _ = train(*args, "--checkpoint-dir", str(tmp_path / "full"))
    assert code == 0
    uninterrupted = records(lines)

    run_epoch = HybridKoopmanTrainer._run_epoch

    def crash_in_epoch_3(self: HybridKoopmanTrainer, epoch: int) -> Any:
        if epoch == 3:
            raise KeyboardInterrupt
        return run_epoch(self, epoch)

    ckpt = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        patch.setattr(HybridKoopmanTrainer, "_run_epoch", crash_in_epoch_3)
        code, lines, err = train(*args, "--checkpoint-dir", ckpt)
    assert code == 130 and "interrupted" in err
    assert [r["epoch"] for r in records(lines)] == [1, 2]
    assert sorted(p.name for p in Path(ckpt).iterdir()) == ["epoch_1.pt", "epoch_2.pt", "last.pt"]

    code, lines, err = train(*args, "--checkpoint-dir", ckpt, "--resume")
    assert code == 0
    assert "resuming from" in err and "after epoch 2" in err
    (resumed,) = records(lines)
    assert without_timing(resumed) == without_timing(uninterrupted[2])


def test_resume_without_a_checkpoint_yet_starts_at_epoch_one(train: Runner, tmp_path: Path) -> None:
    code, lines, err = train(
        *TINY_FLAGS, "--epochs", "1", "--koopman-start-epoch", "0", "--checkpoint-dir", str(tmp_path / "c"), "--resume"
    )
    assert code == 0 and len(lines) == 1 and lines[0].startswith("Epoch 1/1:")
    assert "starting from epoch 1" in err
    assert (tmp_path / "c" / "last.pt").exists()


def test_resume_with_other_flags_is_refused_naming_the_key(train: Runner, tmp_path: Path) -> None:
    # The weight schedule depends on the number of epochs: a 2-epoch run is not the start of a 3-epoch run.
    ckpt = str(tmp_path / "c")
    code, _, _ = train(*TINY_FLAGS, "--epochs", "2", "--koopman-start-epoch", "1", "--checkpoint-dir", ckpt)
    assert code == 0
    code, lines, err = train(
        *TINY_FLAGS, "--epochs", "3", "--koopman-start-epoch", "1", "--checkpoint-dir", ckpt, "--resume"
    )
    assert code == 1 and lines == []
    assert "was made with another config: train.epochs: 2 != 3" in err
    assert len(err.strip().splitlines()) == 1


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(train: Runner, tmp_path: Path) -> None:
    args = [*TINY_FLAGS, "--epochs", "1", "--koopman-start-epoch", "0", "--checkpoint-dir", str(tmp_path / "c")]
    assert train(*args)[0] == 0
    code, lines, err = train(*args, "--resume")
    assert code == 0 and lines == []
    assert "already finished its 1 epochs: nothing to train" in err


@pytest.mark.parametrize(("epochs", "start"), [("2", "2"), ("2", "3"), ("1", None)])
def test_a_start_epoch_that_leaves_no_koopman_epoch_exits_2_naming_the_key(
    train: Runner, tmp_path: Path, epochs: str, start: str | None
) -> None:
    ckpt = tmp_path / "ckpt"
    flags = ["--koopman-start-epoch", start] if start else []  # None: the default start epoch, 3
    code, lines, err = train(*TINY_FLAGS, "--epochs", epochs, *flags, "--checkpoint-dir", str(ckpt))
    assert code == 2 and lines == [] and not ckpt.exists()
    [line] = err.strip().splitlines()
    assert line.startswith("koopman-search train: error: koopman.start_epoch must be < train.epochs")
    assert f"but got koopman.start_epoch={start or 3}, train.epochs={epochs} (command line, " in line
    assert "[koopman.start_epoch]" in line


def test_a_koopman_free_run_may_have_any_start_epoch(train: Runner, tmp_path: Path) -> None:
    config = tmp_path / "off.toml"
    config.write_text("[koopman]\nenabled = false\n[train]\nmax_eval_batches = 2\n", encoding="utf-8")
    code, lines, _ = train("--config", str(config), *TINY_FLAGS, "--epochs", "1")
    assert code == 0 and len(lines) == 1 and lines[0].startswith("Epoch 1/1:")


def test_resume_needs_a_checkpoint_dir(train: Runner) -> None:
    code, lines, err = train(*TINY_FLAGS, "--resume")
    assert code == 2 and lines == []
    assert err.strip() == "koopman-search train: error: --resume needs --checkpoint-dir, but got checkpoint_dir=None"


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--schedule", "bogus", "schedule='bogus' (command line, [koopman.schedule])"),
        ("--fallback-threshold", "-1", "fallback_threshold=-1.0 (command line, [koopman.fallback_threshold])"),
        ("--device", "tpu", "device='tpu' (command line, [train.device])"),
        ("--koopman-fit", "newton", "fit='newton' (command line, [koopman.fit])"),
        ("--epochs", "0", "epochs=0 (command line, [train.epochs])"),
        ("--koopman-dim", "-8", "dim=-8 (command line, [koopman.dim])"),
        ("--data", "wikitext", "source='wikitext' (command line, [data.source])"),
        ("--d-model", "30", "d_model=30, n_heads=4 (command line)"),
    ],
)
def test_bad_flag_value_exits_2_with_one_line_naming_key_and_value_and_writes_nothing(
    train: Runner, tmp_path: Path, flag: str, value: str, expected: str
) -> None:
    ckpt = tmp_path / "ckpt"
    code, lines, err = train(*TINY_FLAGS, flag, value, "--checkpoint-dir", str(ckpt))
    assert code == 2 and lines == []
    assert err.startswith("koopman-search train: error: ")
    assert len(err.strip().splitlines()) == 1
    assert expected in err
    assert not ckpt.exists()


def test_bad_value_in_the_config_file_names_the_file(train: Runner, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[koopman]\nfallback_threshold = -1\n", encoding="utf-8")
    code, _, err = train("--config", str(config), *TINY_FLAGS)
    assert code == 2
    assert f"fallback_threshold=-1.0 ({config}, [koopman.fallback_threshold])" in err


def test_missing_corpus_directory_is_bad_input_naming_it(train: Runner, tmp_path: Path) -> None:
    code, _, err = train(*TINY_FLAGS, "--data", f"files:{tmp_path / 'absent'}")
    assert code == 2
    assert f"the corpus directory must exist, but got {tmp_path / 'absent'}" in err


def test_a_split_too_short_for_one_window_exits_2_and_writes_no_token_cache(
    train: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = tmp_path / "corpus", tmp_path / "cache"
    data.mkdir()
    (data / "train.txt").write_text("the cat sat on the mat\n" * 200, encoding="utf-8")
    for name in ("valid.txt", "test.txt"):
        (data / name).write_text("a few words here\n", encoding="utf-8")  # 5 tokens: no window of 16
    monkeypatch.setenv("KOOPMAN_CACHE_DIR", str(cache))
    code, _, err = train(*TINY_FLAGS, "--data", f"files:{data}")
    assert code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "the valid split must hold at least seq_len + 1 = 17 tokens" in lines[0]
    assert not cache.exists() or list(cache.iterdir()) == []


def test_an_unreadable_split_file_is_bad_input_naming_it(train: Runner, tmp_path: Path) -> None:
    """A split that is not a regular file (here a directory where train.txt should be) cannot be read."""
    data = tmp_path / "corpus"
    data.mkdir()
    for name in ("valid.txt", "test.txt"):
        (data / name).write_text("a few words here\n", encoding="utf-8")
    (data / "train.txt").mkdir()
    code, _, err = train(*TINY_FLAGS, "--data", f"files:{data}")
    assert code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "train split file must exist" in lines[0] and str(data / "train.txt") in lines[0]


def test_non_numeric_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "three"])
    assert info.value.code == 2
    assert "--epochs: invalid int value: 'three'" in capsys.readouterr().err


def test_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "koopman-search train --data files:" in out
