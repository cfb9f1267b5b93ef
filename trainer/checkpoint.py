"""Checkpoint files: their format, reading them back, what may differ on resume, and atomic writes.

A checkpoint holds everything needed to resume exactly (``HybridKoopmanTrainer.state_dict``): the config,
the epoch and step, model and optimizer states, the RNG states and the records so far. It also names the
corpus it was trained on by content (:func:`corpus_fingerprint`), so that a retry may resume on another
machine where the same corpus sits at another path (docs/design.md, "Fault tolerance").

Every file the project writes for others to read (checkpoints, the token cache, the HTML report) goes
through :func:`atomic_write`: a temporary file beside the target, then a rename, so that a reader never
sees half a file and a crash leaves no partial one behind. Importing this module loads no torch (the review
writes its report through it), so torch is imported where a checkpoint is read.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from koopman_search.trainer.config import TrainerConfig, config_to_dict
from koopman_search.trainer.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEYS",
    "RUNTIME_KEYS",
    "UNREADABLE",
    "atomic_write",
    "config_diff",
    "corpus_fingerprint",
    "probe_dir",
    "read_checkpoint",
]

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = (
    "config",
    "epoch",
    "step",
    "since_refit",
    "vocab_size",
    "model",
    "opt_lm",
    "koopman",
    "opt_koopman",
    "rng",
    "records",
)
# Keys that may differ between a checkpoint and the config that resumes it: where it runs, not what it computes.
# data.source is among them because the same corpus may sit at another path on another machine (a retry
# resuming elsewhere); what the corpus IS is compared through its fingerprint instead (corpus_fingerprint).
RUNTIME_KEYS = {("train", "device"), ("train", "progress"), ("data", "cache_dir"), ("data", "source")}

# What torch.load raises on a truncated, garbled or foreign file (a non-tensor pickle is an UnpicklingError;
# a foreign zip may fail inside torch's reader with a KeyError or TypeError).
UNREADABLE = (
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
)


def probe_dir(path: str | Path, size: int = 0) -> None:
    """Make the directory ``path`` (and its parents) and write and remove a file of ``size`` bytes in it
    (flushed to disk when not empty), so that a folder that cannot hold checkpoints is found before any work;
    raises ``OSError``."""
    where = Path(path)
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=where, prefix=".probe-") as fh:
        if size:
            fh.write(b"\0" * size)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], mode: int = 0o644, parents: bool = True) -> Path:
    """Write ``path`` through ``write(file)`` atomically: a temporary file in the same directory, flushed
    to disk, given ``mode``, then renamed over ``path``. Missing parent directories are made when
    ``parents``. On any error the temporary file is removed and the error raised; an existing ``path`` is
    left as it was."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's state, checked for its format and keys. Raises :class:`CheckpointError`."""
    import torch

    try:
        # weights_only: a checkpoint is tensors, numbers, strings and containers; nothing to execute
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except UNREADABLE as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a koopman-search checkpoint of format {CHECKPOINT_FORMAT}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    return state


def config_diff(a: TrainerConfig, b: TrainerConfig, sections: Iterable[str]) -> list[str]:
    """``section.key: a != b`` for every key of ``sections`` that differs, runtime keys left out."""
    da, db = config_to_dict(a), config_to_dict(b)
    return [
        f"{s}.{k}: {da[s][k]!r} != {db[s][k]!r}"
        for s in sections
        for k in da[s]
        if (s, k) not in RUNTIME_KEYS and da[s][k] != db[s][k]
    ]


def corpus_fingerprint(vocab: Sequence[str], splits: Iterable[torch.Tensor]) -> str:
    """What a corpus is, independent of where it lies: its vocabulary and token streams."""
    import torch

    h = hashlib.blake2b(digest_size=12)
    h.update("\n".join(vocab).encode())
    for split in splits:
        h.update(split.to(torch.int32).cpu().numpy().tobytes())
    return h.hexdigest()
