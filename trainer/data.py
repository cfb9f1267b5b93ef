"""Corpus sources, the word vocabulary, the on-disk token cache, and batches of windows.

A corpus source is one of three strings (``DataConfig.source``):

    builtin           a small English corpus shipped with Python itself (the ``pydoc_data`` help topics)
    files:DIR         DIR/train.txt, DIR/valid.txt, DIR/test.txt in WikiText layout (a relative DIR is
                      relative to the working directory)
    hf:NAME/CONFIG    a Hugging Face dataset with a ``text`` column, e.g. hf:wikitext/wikitext-2-raw-v1
                      (needs the optional ``datasets`` package and its network or local cache)

Tokenizing follows pytorch/examples ``word_language_model/data.py``: every line, an empty one included, is
split on whitespace and gets one ``<eos>`` at its end. On WikiText-2 that reproduces the published counts
(train 2088628 tokens). The vocabulary comes from the train split only: ``<unk>`` (id 0), ``<eos>`` (id 1),
then the most frequent words, ties broken by first occurrence, up to ``vocab_size`` entries in all. Every
other word maps to ``<unk>``.

Encoded splits are cached on disk (``torch.save``), keyed by the source, the vocabulary size, the cache
format and a sha256 of the source's content, so an edited file never reuses a stale cache. A cache file is
written to a temporary file and renamed into place, so many workers starting at once never read a
half-written one; an unreadable cache file is logged and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Any

import torch

from koopman_search.trainer.checkpoint import UNREADABLE, atomic_write
from koopman_search.trainer.errors import ConfigError, DataError, DataUnavailable

__all__ = [
    "EOS",
    "SPLITS",
    "UNK",
    "Corpus",
    "check_length",
    "check_source",
    "default_cache_dir",
    "epoch_order",
    "load_corpus",
    "n_windows",
    "window_batches",
]

logger = logging.getLogger(__name__)

UNK = "<unk>"
EOS = "<eos>"
SPECIALS = (UNK, EOS)  # ids 0 and 1, counted inside the vocabulary cap
SPLITS = ("train", "valid", "test")
SOURCE_FORMS = "builtin, files:DIR (train.txt, valid.txt, test.txt) or hf:NAME/CONFIG"
# Bump when the tokenizer, the vocabulary rule or the cache layout changes: old cache files are then unused.
CACHE_FORMAT = 1
CACHE_ENV = "KOOPMAN_CACHE_DIR"
# Accepted file names per split: pytorch/examples' layout first, then those of the official WikiText zips.
SPLIT_FILES = {
    "train": ("train.txt", "wiki.train.tokens", "wiki.train.raw"),
    "valid": ("valid.txt", "wiki.valid.tokens", "wiki.valid.raw"),
    "test": ("test.txt", "wiki.test.tokens", "wiki.test.raw"),
}
HF_SPLITS = {"train": ("train",), "valid": ("validation", "valid"), "test": ("test",)}
# The builtin corpus: the help topics in sorted key order, cut by lines at these fractions (80/10/10).
BUILTIN_CUTS = (0.8, 0.9)


@dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenized corpus: the vocabulary and three 1-D int64 tensors of token ids."""

    vocab: tuple[str, ...]
    train: torch.Tensor  # (N_train,) int64
    valid: torch.Tensor  # (N_valid,) int64
    test: torch.Tensor  # (N_test,) int64
    source: str

    @cached_property
    def _stoi(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.vocab)}

    @property
    def unk_id(self) -> int:
        return self._stoi[UNK]

    @property
    def eos_id(self) -> int:
        return self._stoi[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> torch.Tensor:
        """The tokens of ``train``, ``valid`` or ``test``."""
        if name not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, but got split={name!r}")
        tokens: torch.Tensor = getattr(self, name)
        return tokens

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text``: whitespace words, each newline an ``<eos>``, unknown words ``<unk>``."""
        return _encode(_tokenize(text), self._stoi)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The words of ``ids`` joined by spaces; ``<eos>`` stays literal, so encode(decode(ids)) == ids."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return " ".join(self.vocab[i] for i in values)

    def __repr__(self) -> str:
        return (
            f"Corpus(source={self.source!r}, vocab_size={self.vocab_size}, train={self.train.numel()}, "
            f"valid={self.valid.numel()}, test={self.test.numel()})"
        )


# ----------------------------------------------------------------------------------------------- tokenizing


def _tokenize(text: str) -> list[str]:
    """Whitespace words with ``<eos>`` for every newline (pytorch/examples word_language_model)."""
    return text.replace("\n", f" {EOS} ").split()


def _as_lines(text: str) -> str:
    """Newlines normalised as in Python's text mode, and a last line ended so that it gets its ``<eos>``."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text and not text.endswith("\n"):
        text += "\n"
    return text


def _build_vocab(train_words: list[str], vocab_size: int) -> tuple[str, ...]:
    counts = Counter(train_words)  # insertion order = first occurrence; the stable sort breaks ties by it
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    words = [word for word, _ in ranked if word not in SPECIALS]
    return (*SPECIALS, *words[: vocab_size - len(SPECIALS)])


def _encode(words: list[str], stoi: dict[str, int]) -> torch.Tensor:
    ids = array("q", map(stoi.get, words, repeat(stoi[UNK])))  # C-speed lookups: ~0.1 s per 2M words
    if not ids:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(ids, dtype=torch.int64).clone()


def _tokenize_splits(source: str, texts: dict[str, str], where: dict[str, str], vocab_size: int) -> Corpus:
    words = {split: _tokenize(texts[split]) for split in SPLITS}
    for split in SPLITS:
        if len(words[split]) == words[split].count(EOS):
            raise DataError(
                f"the {split} split must hold at least one word, but got 0 words in {where[split]} (source={source})"
            )
    vocab = _build_vocab(words["train"], vocab_size)
    stoi = {word: i for i, word in enumerate(vocab)}
    encoded = {split: _encode(words[split], stoi) for split in SPLITS}
    return Corpus(vocab=vocab, source=source, **encoded)


# ----------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """A parsed source string."""

    text: str  # as given
    scheme: str  # builtin | files | hf
    target: str  # "" | the resolved directory | NAME/CONFIG


def _parse_source(source: str) -> _Source:
    scheme, sep, rest = source.partition(":")
    if source == "builtin":
        return _Source(source, "builtin", "")
    if sep and scheme == "files" and rest:
        return _Source(source, "files", str(Path(rest).expanduser().resolve()))
    if sep and scheme == "hf":
        name, slash, config = rest.rpartition("/")
        if name and slash and config:
            return _Source(source, "hf", rest)
        raise DataError(
            f"an hf source must look like hf:NAME/CONFIG (e.g. hf:wikitext/wikitext-2-raw-v1), "
            f"but got source={source!r}"
        )
    raise DataError(f"corpus source must be {SOURCE_FORMS}, but got source={source!r}")


def _split_path(directory: Path, split: str, source: str) -> Path:
    for name in SPLIT_FILES[split]:
        if (directory / name).is_file():
            return directory / name
    others = ", ".join(SPLIT_FILES[split][1:])
    raise DataError(
        f"the {split} split file must exist, but got no {directory / SPLIT_FILES[split][0]} "
        f"(nor {others}) (source={source})"
    )


def check_source(source: str) -> None:
    """Raise :class:`DataError` when a ``files:DIR`` source names no directory with the three split files;
    cheap (nothing is read), for commands that train to call before they write anything. Other sources
    are checked when they load (``hf:`` needs the network)."""
    src = _parse_source(source)
    if src.scheme != "files":
        return
    directory = Path(src.target)
    if not directory.is_dir():
        raise DataError(f"the corpus directory must exist, but got {directory} (source={src.text})")
    for split in SPLITS:
        _split_path(directory, split, src.text)


def _read_files(src: _Source) -> tuple[dict[str, bytes], dict[str, str]]:
    directory = Path(src.target)
    if not directory.is_dir():
        raise DataError(f"the corpus directory must exist, but got {directory} (source={src.text})")
    paths = {split: _split_path(directory, split, src.text) for split in SPLITS}
    try:
        raw = {split: path.read_bytes() for split, path in paths.items()}
    except OSError as exc:
        raise DataError(f"cannot read {exc.filename}: {exc.strerror} (source={src.text})") from exc
    return raw, {split: str(path) for split, path in paths.items()}


def _decode_files(src: _Source, raw: dict[str, bytes], where: dict[str, str]) -> dict[str, str]:
    texts = {}
    for split in SPLITS:
        try:
            texts[split] = _as_lines(raw[split].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(
                f"corpus files must be UTF-8 text, but got an undecodable byte at offset {exc.start} of "
                f"{where[split]} (source={src.text})"
            ) from exc
    return texts


def _builtin_texts() -> dict[str, str]:
    """The help topics of CPython's ``pydoc_data`` (~65k words of English prose and examples), cut by lines.

    The topics are joined in sorted key order and cut at 80% and 90% of the lines: the same split on every
    run and machine with the same Python version. The topics change between Python versions; the cache key
    hashes the text, so each version gets its own cache.
    """
    try:
        topics: dict[str, str] = importlib.import_module("pydoc_data.topics").topics
    except ImportError as exc:
        raise DataError(
            "the builtin corpus needs the standard-library module pydoc_data, but got none in this Python; "
            "use source=files:DIR with train.txt, valid.txt, test.txt instead"
        ) from exc
    text = "".join(_as_lines(topics[key]) for key in sorted(topics))
    lines = text.split("\n")[:-1]  # the text ends with "\n"
    cut_valid, cut_test = (round(len(lines) * cut) for cut in BUILTIN_CUTS)
    parts = {"train": lines[:cut_valid], "valid": lines[cut_valid:cut_test], "test": lines[cut_test:]}
    return {split: "".join(line + "\n" for line in part) for split, part in parts.items()}


def _hf_dataset(src: _Source) -> dict[str, Any]:
    name, _, config = src.target.rpartition("/")
    hint = (
        "or download the data and use source=files:DIR with DIR holding train.txt, valid.txt, test.txt "
        "(e.g. files:/data/wikitext-2)"
    )
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as exc:
        raise DataError(
            f"source={src.text} needs the Hugging Face 'datasets' package, but it is not installed; "
            f"install it (pip install 'koopman-search[hf]') {hint}"
        ) from exc
    try:
        loaded = datasets.load_dataset(name, config)
    except ValueError as exc:  # an unknown dataset or config
        raise DataError(f"cannot load Hugging Face dataset {name!r} config {config!r}: {exc}; {hint}") from exc
    except OSError as exc:  # offline, hub errors
        raise DataUnavailable(f"cannot load Hugging Face dataset {name!r} config {config!r}: {exc}; {hint}") from exc
    chosen: dict[str, Any] = {}
    for split, names in HF_SPLITS.items():
        found = [n for n in names if n in loaded]
        if not found:
            raise DataError(
                f"Hugging Face dataset {src.target} must have a {' or '.join(names)} split, but got "
                f"splits {', '.join(loaded)} (source={src.text})"
            )
        chosen[split] = loaded[found[0]]
        if "text" not in chosen[split].column_names:
            raise DataError(
                f"Hugging Face dataset {src.target} must have a 'text' column, but got columns "
                f"{', '.join(chosen[split].column_names)} (source={src.text})"
            )
    return chosen


def _hf_texts(chosen: dict[str, Any]) -> dict[str, str]:
    # One row is one line (wikitext rows keep their "\n"); an empty row is an empty line and gets its <eos>.
    return {split: "".join(_as_lines(row) if row else "\n" for row in chosen[split]["text"]) for split in SPLITS}


def _hf_identity(chosen: dict[str, Any]) -> dict[str, str]:
    # The datasets fingerprint names the prepared data; without one, hash the text itself.
    identity = {}
    for split in SPLITS:
        fingerprint = getattr(chosen[split], "_fingerprint", None)
        if not fingerprint:
            text = "\n".join(chosen[split]["text"])
            fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()
        identity[split] = str(fingerprint)
    return identity


def _open_source(src: _Source) -> tuple[dict[str, str], dict[str, str], Callable[[], dict[str, str]]]:
    """The content identity of each split (for the cache key), where each split lives (for messages), and
    a function returning the splits' text (called on a cache miss only)."""
    if src.scheme == "files":
        raw, where = _read_files(src)
        identity = {split: hashlib.sha256(data).hexdigest() for split, data in raw.items()}
        return identity, where, lambda: _decode_files(src, raw, where)
    where = {split: f"the {split} split" for split in SPLITS}
    if src.scheme == "builtin":
        texts = _builtin_texts()
        identity = {split: hashlib.sha256(texts[split].encode("utf-8")).hexdigest() for split in SPLITS}
        return identity, where, lambda: texts
    chosen = _hf_dataset(src)
    return _hf_identity(chosen), where, lambda: _hf_texts(chosen)


# ----------------------------------------------------------------------------------------------- the cache


def default_cache_dir() -> Path:
    """``$KOOPMAN_CACHE_DIR``, else ``~/.cache/koopman-search``."""
    env = os.environ.get(CACHE_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "koopman-search"


def _cache_key(src: _Source, vocab_size: int, identity: dict[str, str]) -> str:
    fields = {
        "format": CACHE_FORMAT,
        "scheme": src.scheme,
        "target": src.target,
        "vocab_size": vocab_size,
        "content": identity,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


def _read_cache(path: Path, key: str, source: str) -> Corpus | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except UNREADABLE as exc:
        logger.warning("discarding unreadable token cache %s (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return None
    problem = _cache_problem(payload, key)
    if problem:
        logger.warning("discarding token cache %s (%s); rebuilding it", path, problem)
        return None
    splits = {split: payload[split].to(torch.int64) for split in SPLITS}
    return Corpus(vocab=tuple(payload["vocab"]), source=source, **splits)


def _cache_problem(payload: Any, key: str) -> str:
    """Why ``payload`` is not the cache entry for ``key`` ("" when it is)."""
    if not isinstance(payload, dict):
        return f"expected a dict, found {type(payload).__name__}"
    if payload.get("format") != CACHE_FORMAT or payload.get("key") != key:
        return "format or key does not match"
    vocab = payload.get("vocab")
    if not isinstance(vocab, list) or vocab[:2] != list(SPECIALS):
        return "vocabulary is malformed"
    if not all(isinstance(word, str) for word in vocab):
        return "vocabulary is malformed"
    for split in SPLITS:
        tokens = payload.get(split)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.int32:
            return f"{split} is not a 1-D int32 tensor"
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= len(vocab)):
            return f"{split} holds ids outside the vocabulary"
    return ""


def _write_cache(path: Path, key: str, corpus: Corpus) -> None:
    """Write atomically: a temporary file in the same directory, then ``os.replace``."""
    payload = {
        "format": CACHE_FORMAT,
        "key": key,
        "source": corpus.source,
        "vocab": list(corpus.vocab),
        # int32 halves the file; ids are < vocab_size, far below 2**31.
        **{split: corpus.split(split).to(torch.int32) for split in SPLITS},
    }
    try:
        # 0644: a cache is no secret, and other users may share it
        atomic_write(path, lambda fh: torch.save(payload, fh), mode=0o644)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as RuntimeError
        logger.warning("cannot write token cache %s (%s); continuing without it", path, exc)


# ----------------------------------------------------------------------------------------------- loading


def load_corpus(
    source: str, vocab_size: int, cache_dir: str = "", check: Callable[[Corpus], None] | None = None
) -> Corpus:
    """Load ``source`` (``builtin``, ``files:DIR`` or ``hf:NAME/CONFIG``) with at most ``vocab_size`` words.

    The encoded splits are cached under ``cache_dir`` (default: :func:`default_cache_dir`), once ``check``
    (the caller's own test of the corpus, e.g. that a split holds a window) has passed: a run refused for its
    input writes nothing. Raises :class:`DataError` for an unknown source, a missing directory or split file,
    or an empty split, and whatever ``check`` raises.
    """
    if vocab_size < len(SPECIALS):
        raise ConfigError(
            f"vocab_size must be >= {len(SPECIALS)} (room for {UNK} and {EOS}), but got vocab_size={vocab_size}"
        )
    start = time.perf_counter()
    src = _parse_source(source)
    identity, where, read_texts = _open_source(src)
    key = _cache_key(src, vocab_size, identity)
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = directory / f"{src.scheme}-{key[:32]}.pt"
    cached = _read_cache(path, key, source)
    if cached is not None:
        logger.info("corpus %s: token cache hit %s (%.2f s)", source, path, time.perf_counter() - start)
        if check is not None:
            check(cached)
        return cached

    corpus = _tokenize_splits(source, read_texts(), where, vocab_size)
    if check is not None:
        check(corpus)
    _write_cache(path, key, corpus)
    logger.info(
        "corpus %s: token cache miss; tokenized %d/%d/%d tokens (vocab %d) in %.2f s, cached at %s",
        source,
        corpus.train.numel(),
        corpus.valid.numel(),
        corpus.test.numel(),
        corpus.vocab_size,
        time.perf_counter() - start,
        path,
    )
    return corpus


# ----------------------------------------------------------------------------------------------- batches


def n_windows(n_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of ``seq_len`` inputs (plus one target) in ``n_tokens`` tokens."""
    if seq_len <= 0:
        raise ConfigError(f"seq_len must be > 0, but got seq_len={seq_len}")
    return max(0, (n_tokens - 1) // seq_len)


def check_length(tokens: torch.Tensor, seq_len: int, split: str, source: str = "") -> None:
    """Raise :class:`DataError` unless ``tokens`` holds one window (``seq_len + 1`` tokens) or more."""
    if n_windows(tokens.numel(), seq_len) < 1:
        where = f" (source={source})" if source else ""
        raise DataError(
            f"the {split} split must hold at least seq_len + 1 = {seq_len + 1} tokens for one window, "
            f"but got tokens={tokens.numel()}, seq_len={seq_len}{where}"
        )


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of ``range(n)`` that depends on ``(seed, epoch)`` only.

    It comes from a private generator, never the global RNG, so model code that draws random numbers
    (dropout, the Koopman token sample) cannot shift the data order: every Koopman setting sees the same
    batches in the same order.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, but got n={n}")
    digest = hashlib.blake2b(f"koopman-search/epoch_order/{seed}/{epoch}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.randperm(n, generator=generator)


def window_batches(
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int,
    order: torch.Tensor | None,
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of shape ``(B, seq_len)`` with ``y`` the token after each of ``x``.

    Window ``i`` covers ``tokens[i*T : i*T+T+1]``; ``order`` lists window indices (``None``: 0, 1, 2, ...
    for evaluation). Indices are built on ``tokens.device`` and gathered there, so a corpus on a GPU needs
    no host sync per batch. With ``drop_last`` a final batch smaller than ``batch_size`` is skipped
    (training); without it the last batch may be smaller (evaluation). The last ``(len(tokens) - 1) % T``
    tokens are in no window.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, but got batch_size={batch_size}")
    if tokens.dim() != 1:
        raise DataError(f"tokens must be a 1-D tensor, but got shape={tuple(tokens.shape)}")
    n = n_windows(tokens.numel(), seq_len)
    device = tokens.device
    if order is None:
        order = torch.arange(n, device=device)
    else:
        # Checked once per call, not per batch: an index out of range is a device-side assert on a GPU.
        if order.dim() != 1 or order.dtype not in (torch.int32, torch.int64):
            raise DataError(
                f"order must be a 1-D integer tensor, but got shape={tuple(order.shape)}, dtype={order.dtype}"
            )
        if order.numel() and (int(order.min()) < 0 or int(order.max()) >= n):
            raise DataError(
                f"order must hold window indices in [0, {n}), but got min={int(order.min())}, "
                f"max={int(order.max())} (tokens={tokens.numel()}, seq_len={seq_len})"
            )
        order = order.to(device=device, dtype=torch.int64)
    offsets = torch.arange(seq_len, device=device)  # (T,)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size, None] * seq_len + offsets  # (B, T)
        yield tokens[idx], tokens[idx + 1]
