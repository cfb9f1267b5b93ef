"""Corpus sources, vocabulary, token cache, epoch order and window batches (trainer/data.py)."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from koopman_search.trainer import data
from koopman_search.trainer.data import (
    EOS,
    UNK,
    Corpus,
    check_length,
    default_cache_dir,
    epoch_order,
    load_corpus,
    n_windows,
    window_batches,
)
from koopman_search.trainer.errors import ConfigError, DataError, DataUnavailable

# WikiText-2 counts from its README (tokens include one <eos> per line) and pytorch/examples' vocabulary.
WIKITEXT2_TOKENS = {"train": 2088628, "valid": 217646, "test": 245569}
WIKITEXT2_FULL_VOCAB = 33278


def write_corpus(directory: Path, train: str, valid: str = "x\n", test: str = "x\n") -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("train.txt", train), ("valid.txt", valid), ("test.txt", test)):
        (directory / name).write_text(text, encoding="utf-8")
    return f"files:{directory}"


def words(corpus: Corpus, ids: torch.Tensor) -> list[str]:
    return [corpus.vocab[i] for i in ids.tolist()]


def cache_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.pt"))


def forbid_tokenizing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(text: str) -> list[str]:
        raise AssertionError("tokenized although the cache should have been hit")

    monkeypatch.setattr(data, "_tokenize", fail)


@pytest.fixture(scope="module")
def wikitext2(wikitext2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Corpus, Path]:
    """WikiText-2 tokenized once per module (a few seconds), with the cache directory it was written to."""
    cache = tmp_path_factory.mktemp("wikitext2-cache")
    return load_corpus(f"files:{wikitext2_dir}", 30000, cache_dir=str(cache)), cache


# ----------------------------------------------------------------------------------------------- tokenizing


def test_every_line_gets_eos_including_empty_and_unterminated_lines(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train=" a b \n \n\nc d", valid="a\r\nb\r\n", test="b\n")
    corpus = load_corpus(source, 100, cache_dir=str(tmp_path / "cache"))
    assert words(corpus, corpus.train) == ["a", "b", EOS, EOS, EOS, "c", "d", EOS]
    assert words(corpus, corpus.valid) == ["a", EOS, "b", EOS]  # \r\n reads as \n, as in text mode


def test_vocab_comes_from_train_split_only(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train="a a b\n", valid="c a\n", test="d b\n")
    corpus = load_corpus(source, 100, cache_dir=str(tmp_path / "cache"))
    assert corpus.vocab == (UNK, EOS, "a", "b")
    assert words(corpus, corpus.valid) == [UNK, "a", EOS]
    assert words(corpus, corpus.test) == [UNK, "b", EOS]


def test_vocab_is_most_frequent_first_ties_broken_by_first_occurrence(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train="x w y y z z\nz\n")
    corpus = load_corpus(source, 100, cache_dir=str(tmp_path / "cache"))
    assert corpus.vocab == (UNK, EOS, "z", "y", "x", "w")


@pytest.mark.parametrize(
    ("vocab_size", "expected"),
    [
        (2, (UNK, EOS)),
        (3, (UNK, EOS, "z")),
        (5, (UNK, EOS, "z", "y", "x")),
        (6, (UNK, EOS, "z", "y", "x", "w")),
        (7, (UNK, EOS, "z", "y", "x", "w")),  # fewer words than the cap
    ],
)
def test_vocab_cap_counts_the_special_tokens(tmp_path: Path, vocab_size: int, expected: tuple[str, ...]) -> None:
    source = write_corpus(tmp_path / "c", train="x w y y z z\nz\n")
    corpus = load_corpus(source, vocab_size, cache_dir=str(tmp_path / "cache"))
    assert corpus.vocab == expected
    assert corpus.vocab_size == len(expected)
    assert (corpus.train < corpus.vocab_size).all()


def test_words_beyond_the_cap_and_literal_unk_map_to_unk(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train="a a a b b c <unk>\n")
    corpus = load_corpus(source, 4, cache_dir=str(tmp_path / "cache"))
    assert corpus.vocab == (UNK, EOS, "a", "b")
    assert corpus.train.tolist() == [2, 2, 2, 3, 3, corpus.unk_id, corpus.unk_id, corpus.eos_id]
    assert (corpus.unk_id, corpus.eos_id) == (0, 1)


def test_vocab_size_below_two_is_rejected(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train="a\n")
    with pytest.raises(ConfigError, match=r"vocab_size must be >= 2 .*vocab_size=1"):
        load_corpus(source, 1, cache_dir=str(tmp_path / "cache"))


def test_encode_and_decode_round_trip(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train="the cat sat\nthe dog\n")
    corpus = load_corpus(source, 100, cache_dir=str(tmp_path / "cache"))
    ids = corpus.encode("the cat flew\nthe")
    assert words(corpus, ids) == ["the", "cat", UNK, EOS, "the"]
    assert ids.dtype == torch.int64
    assert corpus.decode(ids) == f"the cat {UNK} {EOS} the"
    assert torch.equal(corpus.encode(corpus.decode(ids)), ids)
    assert corpus.encode("").numel() == 0


def test_official_wikitext_file_names_are_accepted(tmp_path: Path) -> None:
    directory = tmp_path / "wikitext-2"
    directory.mkdir()
    for split in ("train", "valid", "test"):
        (directory / f"wiki.{split}.tokens").write_text(f" {split} words \n", encoding="utf-8")
    corpus = load_corpus(f"files:{directory}", 100, cache_dir=str(tmp_path / "cache"))
    assert words(corpus, corpus.test) == [UNK, "words", EOS]


def test_relative_directory_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_corpus(tmp_path / "corpus", train="here\n")
    monkeypatch.chdir(tmp_path)
    corpus = load_corpus("files:corpus", 100, cache_dir=str(tmp_path / "cache"))
    assert corpus.vocab == (UNK, EOS, "here")
    assert corpus.source == "files:corpus"


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("source", ["", "wikitext", "file:/data", "files:", "builtin:small", "s3://bucket/x"])
def test_unknown_source_names_the_three_forms(tmp_path: Path, source: str) -> None:
    with pytest.raises(DataError, match=r"builtin, files:DIR .* or hf:NAME/CONFIG, but got source="):
        load_corpus(source, 100, cache_dir=str(tmp_path))


@pytest.mark.parametrize("source", ["hf:", "hf:wikitext", "hf:wikitext/", "hf:/wikitext-2-raw-v1"])
def test_hf_source_without_name_and_config_is_rejected(tmp_path: Path, source: str) -> None:
    with pytest.raises(DataError, match=r"must look like hf:NAME/CONFIG .*but got source="):
        load_corpus(source, 100, cache_dir=str(tmp_path))


def test_missing_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"directory must exist, but got {missing}"):
        load_corpus(f"files:{missing}", 100, cache_dir=str(tmp_path))


def test_missing_split_file_names_the_path(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", train="a\n")
    (tmp_path / "c" / "test.txt").unlink()
    expected = re.escape(f"test split file must exist, but got no {tmp_path / 'c' / 'test.txt'}")
    with pytest.raises(DataError, match=expected):
        load_corpus(f"files:{tmp_path / 'c'}", 100, cache_dir=str(tmp_path))


@pytest.mark.parametrize("valid", ["", " \n \n", "\n"])
def test_split_without_words_is_rejected(tmp_path: Path, valid: str) -> None:
    source = write_corpus(tmp_path / "c", train="a\n", valid=valid)
    expected = r"valid split must hold at least one word, but got 0 words in .*valid\.txt"
    with pytest.raises(DataError, match=expected):
        load_corpus(source, 100, cache_dir=str(tmp_path / "cache"))


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train="a\n")
    (tmp_path / "c" / "train.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(DataError, match=r"must be UTF-8 text, but got an undecodable byte at offset 3 of"):
        load_corpus(source, 100, cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------- cache


def test_cache_hit_returns_identical_tensors_without_tokenizing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_corpus(tmp_path / "c", train="a b a\nc\n", valid="a z\n", test="b\n")
    first = load_corpus(source, 100, cache_dir=str(tmp_path / "cache"))
    forbid_tokenizing(monkeypatch)
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        second = load_corpus(source, 100, cache_dir=str(tmp_path / "cache"))
    assert "token cache hit" in caplog.text
    assert second.vocab == first.vocab
    for split in ("train", "valid", "test"):
        assert torch.equal(second.split(split), first.split(split))
        assert second.split(split).dtype == torch.int64


def test_cache_goes_to_cache_dir_argument_else_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_corpus(tmp_path / "c", train="a\n")
    monkeypatch.setenv("KOOPMAN_CACHE_DIR", str(tmp_path / "from-env"))
    load_corpus(source, 100, cache_dir=str(tmp_path / "from-arg"))
    assert len(cache_files(tmp_path / "from-arg")) == 1
    assert not (tmp_path / "from-env").exists()
    load_corpus(source, 100)
    assert len(cache_files(tmp_path / "from-env")) == 1


def test_default_cache_dir_is_under_home_without_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOOPMAN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "koopman-search"


def test_edited_file_invalidates_cache_even_with_same_size_and_mtime(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train="a b\n", valid="a a\n")
    cache = str(tmp_path / "cache")
    before = load_corpus(source, 100, cache_dir=cache)
    valid = tmp_path / "c" / "valid.txt"
    stat = valid.stat()
    valid.write_text("b b\n", encoding="utf-8")
    os.utime(valid, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = load_corpus(source, 100, cache_dir=cache)
    assert words(before, before.valid) == ["a", "a", EOS]
    assert words(after, after.valid) == ["b", "b", EOS]
    assert len(cache_files(tmp_path / "cache")) == 2


def test_vocab_size_is_part_of_the_cache_key(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train="a a b\n")
    cache = str(tmp_path / "cache")
    assert load_corpus(source, 3, cache_dir=cache).vocab == (UNK, EOS, "a")
    assert load_corpus(source, 4, cache_dir=cache).vocab == (UNK, EOS, "a", "b")


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a torch file")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign(path: Path) -> None:
    torch.save({"format": data.CACHE_FORMAT, "key": "someone else's"}, path)


def _ids_out_of_range(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    payload["train"][0] = len(payload["vocab"])
    torch.save(payload, path)


@pytest.mark.parametrize("damage", [_garbage, _truncated, _foreign, _ids_out_of_range])
def test_damaged_cache_file_is_discarded_and_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    source = write_corpus(tmp_path / "c", train="a b a\n")
    cache = tmp_path / "cache"
    good = load_corpus(source, 100, cache_dir=str(cache))
    (path,) = cache_files(cache)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        rebuilt = load_corpus(source, 100, cache_dir=str(cache))
    assert "discarding" in caplog.text and str(path) in caplog.text
    assert torch.equal(rebuilt.train, good.train)
    forbid_tokenizing(monkeypatch)  # the rebuilt file is whole again
    assert torch.equal(load_corpus(source, 100, cache_dir=str(cache)).train, good.train)


def test_failed_cache_write_leaves_no_partial_file_and_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_corpus(tmp_path / "c", train="a b\n")
    cache = tmp_path / "cache"

    def disk_full(obj: object, f: Any) -> None:
        f.write(b"half a file")
        raise RuntimeError("PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", disk_full)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        corpus = load_corpus(source, 100, cache_dir=str(cache))
    assert words(corpus, corpus.train) == ["a", "b", EOS]
    assert "cannot write token cache" in caplog.text
    assert list(cache.iterdir()) == []


def test_unusable_cache_dir_is_logged_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = write_corpus(tmp_path / "c", train="a b\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        corpus = load_corpus(source, 100, cache_dir=str(blocker / "cache"))
    assert corpus.vocab == (UNK, EOS, "a", "b")
    assert "continuing without it" in caplog.text


def test_concurrent_loads_agree_and_leave_only_the_cache_file(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "c", train=" ".join(f"w{i % 97}" for i in range(20000)) + "\n")
    cache = tmp_path / "cache"
    results: list[Corpus] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_corpus(source, 50, cache_dir=str(cache)))) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6
    assert all(torch.equal(r.train, results[0].train) and r.vocab == results[0].vocab for r in results)
    assert [p.name for p in cache.iterdir()] == [cache_files(cache)[0].name]


# ----------------------------------------------------------------------------------------------- sources


def test_builtin_corpus_is_real_english_and_deterministic(tmp_path: Path) -> None:
    first = load_corpus("builtin", 30000, cache_dir=str(tmp_path / "one"))
    second = load_corpus("builtin", 30000, cache_dir=str(tmp_path / "two"))
    assert first.train.numel() > 50_000
    assert first.valid.numel() > 5_000 and first.test.numel() > 5_000
    assert second.vocab == first.vocab
    for split in ("train", "valid", "test"):
        assert torch.equal(second.split(split), first.split(split))
    assert {"the", "of", "and", "is"} <= set(first.vocab[2:20])


def test_builtin_corpus_is_capped(tmp_path: Path) -> None:
    corpus = load_corpus("builtin", 500, cache_dir=str(tmp_path))
    assert corpus.vocab_size == 500
    assert (corpus.valid == corpus.unk_id).any()


def test_wikitext2_has_the_published_token_counts(wikitext2: tuple[Corpus, Path]) -> None:
    corpus, _ = wikitext2
    assert {split: corpus.split(split).numel() for split in WIKITEXT2_TOKENS} == WIKITEXT2_TOKENS
    assert corpus.vocab_size == 30000
    assert corpus.vocab[:3] == (UNK, EOS, "the")
    assert int((corpus.train == corpus.eos_id).sum()) == 36718  # lines in train.txt


def test_wikitext2_cache_hit_matches_the_tokenized_corpus(
    wikitext2: tuple[Corpus, Path], wikitext2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus, cache = wikitext2
    forbid_tokenizing(monkeypatch)
    cached = load_corpus(f"files:{wikitext2_dir}", 30000, cache_dir=str(cache))
    assert cached.vocab == corpus.vocab
    for split in ("train", "valid", "test"):
        assert torch.equal(cached.split(split), corpus.split(split))


def test_wikitext2_uncapped_vocab_matches_pytorch_examples(wikitext2_dir: Path, tmp_path: Path) -> None:
    corpus = load_corpus(f"files:{wikitext2_dir}", 10**6, cache_dir=str(tmp_path))
    # pytorch/examples builds its vocabulary from all three splits; WikiText-2's valid/test words all occur
    # in train, so the train-only vocabulary is the same size.
    assert corpus.vocab_size == WIKITEXT2_FULL_VOCAB


def test_hf_without_datasets_package_says_to_use_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"needs the Hugging Face 'datasets' package.*use source=files:DIR"):
        load_corpus("hf:wikitext/wikitext-2-raw-v1", 30000, cache_dir=str(tmp_path))


class _FakeSplit:
    def __init__(self, rows: list[str], fingerprint: str) -> None:
        self.column_names = ["text"]
        self._rows = rows
        self._fingerprint = fingerprint

    def __getitem__(self, column: str) -> list[str]:
        return list(self._rows) if column == "text" else []


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load: Any) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, config: str) -> Any:
        calls.append((name, config))
        return load()

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hf_dataset_rows_are_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = {
        "train": _FakeSplit(["", " = Title = \n", "", " a b a \n"], "fp-train"),
        "validation": _FakeSplit([" a c \n"], "fp-valid"),
        "test": _FakeSplit([" b"], "fp-test"),
    }
    calls = _fake_datasets(monkeypatch, lambda: splits)
    corpus = load_corpus("hf:Salesforce/wikitext/wikitext-2-raw-v1", 100, cache_dir=str(tmp_path))
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]
    assert words(corpus, corpus.train) == [EOS, "=", "Title", "=", EOS, EOS, "a", "b", "a", EOS]
    assert words(corpus, corpus.valid) == ["a", UNK, EOS]
    assert words(corpus, corpus.test) == ["b", EOS]
    forbid_tokenizing(monkeypatch)  # the same fingerprints hit the cache
    assert torch.equal(load_corpus("hf:Salesforce/wikitext/wikitext-2-raw-v1", 100, str(tmp_path)).train, corpus.train)


def test_hf_unreachable_says_to_use_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline() -> Any:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, offline)
    # out of reach is a runtime condition (exit 1), not bad input (DataError, exit 2)
    with pytest.raises(DataUnavailable, match=r"cannot load Hugging Face dataset 'wikitext'.*Hub.*files:DIR"):
        load_corpus("hf:wikitext/wikitext-2-raw-v1", 100, cache_dir=str(tmp_path))


def test_hf_dataset_without_a_validation_split_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, lambda: {"train": _FakeSplit(["a"], "f"), "test": _FakeSplit(["a"], "g")})
    with pytest.raises(DataError, match=r"must have a validation or valid split, but got splits train, test"):
        load_corpus("hf:some/config", 100, cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    ("n_tokens", "seq_len", "expected"),
    [(0, 4, 0), (1, 4, 0), (4, 4, 0), (5, 4, 1), (8, 4, 1), (9, 4, 2), (2088628, 128, 16317)],
)
def test_n_windows_counts_non_overlapping_windows_with_one_target_token(
    n_tokens: int, seq_len: int, expected: int
) -> None:
    assert n_windows(n_tokens, seq_len) == expected


def test_n_windows_rejects_non_positive_seq_len() -> None:
    with pytest.raises(ConfigError, match=r"seq_len must be > 0, but got seq_len=0"):
        n_windows(10, 0)


def test_check_length_accepts_exactly_one_window() -> None:
    check_length(torch.arange(5), 4, "valid")


def test_check_length_names_split_tokens_and_seq_len() -> None:
    expected = r"the valid split must hold .* 5 tokens .*tokens=4, seq_len=4 \(source=x\)"
    with pytest.raises(DataError, match=expected):
        check_length(torch.arange(4), 4, "valid", source="x")


def test_window_batches_are_shifted_by_one_token() -> None:
    tokens = torch.arange(100) * 10
    order = torch.tensor([3, 0, 5])
    batches = list(window_batches(tokens, 8, 2, order, drop_last=False))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 8), (1, 8)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    for row, window in enumerate(order.tolist()):
        assert torch.equal(x[row], tokens[window * 8 : window * 8 + 8])
        assert torch.equal(y[row], tokens[window * 8 + 1 : window * 8 + 9])
    assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()


@pytest.mark.parametrize(("n_order", "expected_batches"), [(7, 2), (6, 2), (5, 1), (2, 0)])
def test_drop_last_keeps_only_full_batches(n_order: int, expected_batches: int) -> None:
    tokens = torch.arange(200)
    batches = list(window_batches(tokens, 4, 3, torch.arange(n_order), drop_last=True))
    assert len(batches) == expected_batches
    assert all(x.shape == (3, 4) and y.shape == (3, 4) for x, y in batches)


def test_evaluation_batches_cover_every_window_token_exactly_once() -> None:
    tokens = torch.arange(1003)  # 1002 // 10 = 100 windows, the last 2 tokens in none
    seq_len, batch_size = 10, 7
    batches = list(window_batches(tokens, seq_len, batch_size, None, drop_last=False))
    assert len(batches) == 15 and batches[-1][0].shape == (100 - 14 * 7, seq_len)
    inputs = torch.cat([x.flatten() for x, _ in batches])
    targets = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(inputs, torch.arange(0, 1000))
    assert torch.equal(targets, torch.arange(1, 1001))
    assert tokens.numel() - 1 - targets.numel() < seq_len


def test_window_batches_yield_nothing_when_shorter_than_one_window() -> None:
    assert list(window_batches(torch.arange(4), 4, 2, None, drop_last=False)) == []


def test_window_batches_reject_order_outside_the_windows() -> None:
    with pytest.raises(DataError, match=r"order must hold window indices in \[0, 2\), but got min=0, max=2"):
        list(window_batches(torch.arange(9), 4, 2, torch.tensor([0, 2]), drop_last=False))


def test_window_batches_reject_a_float_order() -> None:
    with pytest.raises(DataError, match=r"order must be a 1-D integer tensor, but got shape=\(2,\)"):
        list(window_batches(torch.arange(9), 4, 2, torch.tensor([0.0, 1.0]), drop_last=False))


def test_window_batches_reject_non_positive_batch_size() -> None:
    with pytest.raises(ConfigError, match=r"batch_size must be > 0, but got batch_size=0"):
        list(window_batches(torch.arange(9), 4, 0, None, drop_last=False))


# ----------------------------------------------------------------------------------------------- epoch order


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    order = epoch_order(1000, seed=7, epoch=3)
    assert torch.equal(order.sort().values, torch.arange(1000))
    assert torch.equal(order, epoch_order(1000, seed=7, epoch=3))
    assert order.dtype == torch.int64


def test_epoch_order_differs_between_epochs_and_seeds() -> None:
    base = epoch_order(1000, seed=7, epoch=3)
    assert not torch.equal(base, epoch_order(1000, seed=7, epoch=4))
    assert not torch.equal(base, epoch_order(1000, seed=8, epoch=3))
    assert not torch.equal(epoch_order(1000, seed=0, epoch=1), epoch_order(1000, seed=1, epoch=0))


def test_epoch_order_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = epoch_order(500, seed=1, epoch=1)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # the global RNG does not steer the order either
    assert torch.equal(epoch_order(500, seed=1, epoch=1), first)


def test_epoch_order_of_zero_windows_is_empty_and_negative_is_rejected() -> None:
    assert epoch_order(0, seed=0, epoch=1).numel() == 0
    with pytest.raises(ConfigError, match=r"n must be >= 0, but got n=-1"):
        epoch_order(-1, seed=0, epoch=1)
