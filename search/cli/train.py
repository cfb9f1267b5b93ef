"""``koopman-search train``: one training run of the hybrid trainer, no study involved."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from koopman_search.search.cli._common import add_threads_arg, check_counts, use_threads
from koopman_search.trainer.checkpoint import probe_dir
from koopman_search.trainer.config import FIT_MODES, LOSSES, SCHEDULES, TrainerConfig, load_config, with_overrides
from koopman_search.trainer.errors import ConfigError
from koopman_search.trainer.records import EpochRecord

__all__ = ["FLAG_KEYS", "add_parser", "format_record", "run"]

logger = logging.getLogger(__name__)

# flag dest -> (config key, type, help)
FLAG_KEYS: dict[str, tuple[str, type, str]] = {
    "data": ("data.source", str, "corpus: builtin | files:DIR | hf:NAME/CONFIG"),
    "epochs": ("train.epochs", int, "number of epochs E"),
    "seed": ("train.seed", int, "seed of initialisation and data order"),
    "device": ("train.device", str, "auto | cpu | cuda | cuda:N"),
    "koopman_weight_max": ("koopman.weight_max", float, "Koopman weight reached at the last epoch"),
    "koopman_start_epoch": ("koopman.start_epoch", int, "epochs 1..s are pure LM training"),
    "fallback_threshold": ("koopman.fallback_threshold", float, "Koopman loss above which the weight is cut"),
    "schedule": ("koopman.schedule", str, f"weight schedule: {', '.join(SCHEDULES)}"),
    "koopman_dim": ("koopman.dim", int, "Koopman (lifted) dimension k"),
    "koopman_fit": ("koopman.fit", str, f"owner of K: {' | '.join(FIT_MODES)}"),
    "koopman_loss": ("koopman.loss", str, f"Koopman objective: {' | '.join(LOSSES)}"),
    "batch_size": ("data.batch_size", int, "sequences per batch"),
    "seq_len": ("data.seq_len", int, "tokens per sequence"),
    "d_model": ("model.d_model", int, "hidden width"),
    "n_layers": ("model.n_layers", int, "number of blocks"),
    "vocab_size": ("data.vocab_size", int, "vocabulary cap (train split only)"),
    "lr": ("train.lr", float, "AdamW learning rate"),
    "max_steps_per_epoch": ("train.max_steps_per_epoch", int, "cap on training steps per epoch (0 = all)"),
}

EXAMPLE = """example:
  koopman-search train --data files:../shared/data/wikitext-2 --epochs 3 \\
      --koopman-start-epoch 1 --max-steps-per-epoch 50 --json
  koopman-search train --config best.toml --checkpoint-dir runs/best   # then --resume to continue
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="train once with the hybrid Koopman trainer",
        description="Train the language model with the hybrid Koopman loss. Flags override --config.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.toml", help="trainer config ([data] [model] [koopman] [train])")
    for dest, (key, kind, help_text) in FLAG_KEYS.items():
        flag = "--" + dest.replace("_", "-")
        p.add_argument(
            flag, dest=dest, type=kind, default=None, metavar=kind.__name__.upper(), help=f"{help_text} [{key}]"
        )
    p.add_argument("--checkpoint-dir", metavar="DIR", help="save epoch_E.pt and last.pt here after each epoch")
    p.add_argument("--resume", action="store_true", help="continue from DIR/last.pt of --checkpoint-dir")
    p.add_argument("--json", action="store_true", help="one JSON object per epoch on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_threads_arg(p)
    return p


def _load(path: str) -> TrainerConfig:
    """``--config`` read, with every way a path can be wrong as one line (exit 2)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config must be a TOML file, but got a directory: config={path!r}")
    if p.exists() and not p.is_file():
        raise ConfigError(f"--config must be a regular file, but got a special file: config={path!r}")
    try:
        return load_config(p)
    except OSError as exc:
        raise ConfigError(f"--config cannot be read: {exc.strerror or exc} (config={path!r})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config must be UTF-8 text, but got {exc.reason} (config={path!r})") from None
    except RecursionError:
        raise ConfigError(f"--config nests its tables or arrays too deeply to read (config={path!r})") from None


def _check_checkpoint_dir(path: str) -> None:
    """``--checkpoint-dir`` made and written to once before the first epoch, not after it."""
    try:
        probe_dir(path)
    except OSError as exc:
        raise ConfigError(
            f"--checkpoint-dir must be a directory this process can write to, but got "
            f"checkpoint_dir={path!r} ({exc.strerror or exc})"
        ) from None


def build_config(args: argparse.Namespace) -> TrainerConfig:
    cfg = _load(args.config) if args.config else TrainerConfig()
    overrides = {key: getattr(args, dest) for dest, (key, _, _) in FLAG_KEYS.items() if getattr(args, dest) is not None}
    overrides["train.progress"] = not args.no_progress and sys.stderr.isatty()
    cfg = with_overrides(cfg, overrides, origin="command line")
    _check_koopman_epochs(cfg, args)
    return cfg


def _check_koopman_epochs(cfg: TrainerConfig, args: argparse.Namespace) -> None:
    """Epochs 1..s are pure LM training (docs/design.md, "Epochs"): with s >= E the Koopman loss would
    never be on, which is a mistake unless it was turned off on purpose."""
    s, epochs = cfg.koopman.start_epoch, cfg.train.epochs
    if not cfg.koopman.enabled or s < epochs:
        return
    where = (
        ", ".join(
            filter(
                None,
                [
                    "command line" if args.koopman_start_epoch is not None or args.epochs is not None else "",
                    str(args.config) if args.config else "",
                ],
            )
        )
        or "defaults"
    )
    raise ConfigError(
        f"koopman.start_epoch must be < train.epochs (epochs 1..s are pure LM training, the Koopman loss is "
        f"on from s+1), but got koopman.start_epoch={s}, train.epochs={epochs} ({where}, "
        "[koopman.start_epoch]); lower --koopman-start-epoch, raise --epochs, or set "
        "[koopman] enabled = false for a Koopman-free run"
    )


def format_record(r: EpochRecord) -> str:
    """One line per epoch, in the user's own notebook format."""
    return (
        f"Epoch {r.epoch}/{r.epochs}: Train Loss {r.total_loss:.4f} (LM {r.lm_loss:.4f}, "
        f"Koopman {r.koopman_loss:.4f}) weight {r.koopman_weight:.4f} | val PPL {r.val_ppl:.2f}"
        + (f" | NRE {r.val_koopman_nre:.4f}" if not math.isnan(r.val_koopman_nre) else "")
        + (f" | gain {r.val_koopman_gain:.3g}" if not math.isnan(r.val_koopman_gain) else "")
        + (f" | φ rank {r.phi_effective_rank:.2f}" if not math.isnan(r.phi_effective_rank) else "")
        + (f" | Koopman PPL {r.val_koopman_forward_ppl:.2f}" if not math.isnan(r.val_koopman_forward_ppl) else "")
        + (f" | fallback {r.fallback_batches}" if r.fallback_batches else "")
        + f" | {r.seconds:.1f} s"
    )


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, list):
        return [_finite_or_none(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _json_record(r: EpochRecord) -> str:
    return json.dumps({k: _finite_or_none(v) for k, v in r.to_dict().items()})


def run(args: argparse.Namespace) -> int:
    from koopman_search.trainer.loop import HybridKoopmanTrainer

    check_counts(args)
    cfg = build_config(args)
    use_threads(args.threads)
    if args.resume and not args.checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint-dir, but got checkpoint_dir=None")
    if args.checkpoint_dir:
        _check_checkpoint_dir(args.checkpoint_dir)
    last = Path(args.checkpoint_dir) / "last.pt" if args.checkpoint_dir else None
    if args.resume and last is not None and last.exists():
        trainer = HybridKoopmanTrainer.from_checkpoint(last, cfg)
        if trainer.epoch >= cfg.train.epochs:
            logger.info(
                "the run in %s already finished its %d epochs: nothing to train (its records are in "
                "%s; a run of more epochs is another run)",
                args.checkpoint_dir,
                cfg.train.epochs,
                last,
            )
            return 0
        logger.info("resuming from %s after epoch %d", last, trainer.epoch)
    else:
        if args.resume:
            logger.info("no checkpoint at %s yet: starting from epoch 1", last)
        trainer = HybridKoopmanTrainer(cfg)

    def show(record: EpochRecord) -> None:
        print(_json_record(record) if args.json else format_record(record), flush=True)

    trainer.fit(callback=show, checkpoint_dir=args.checkpoint_dir)
    return 0
