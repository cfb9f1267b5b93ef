"""HybridKoopmanTrainer: epochs, evaluation, checkpoints and the per-epoch callback.

One training step, top to bottom: weight for this epoch → forward → LM loss + weighted Koopman loss →
backward → clip → optimizer steps → ``zero_grad(set_to_none=True)``. Per-step numbers stay on the device
and are read once per epoch (or when the progress bar refreshes), so a step makes no host sync.

Determinism (the search shares warmup epochs between trials, docs/design.md):

* the backbone is built right after ``torch.manual_seed(seed)``; the Koopman heads use a private generator;
* the data order of epoch e comes from a private generator seeded by (seed, e);
* the Koopman heads have their own optimizer, and epochs 1..s never compute the Koopman loss;

so epochs 1..s are bit-identical (on CPU) for every Koopman setting, and equal to the baseline's.
The checkpoint format and its checks are in :mod:`trainer.checkpoint`.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from koopman_search.trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_write,
    config_diff,
    corpus_fingerprint,
    read_checkpoint,
)
from koopman_search.trainer.config import TrainerConfig, config_from_dict, config_to_dict
from koopman_search.trainer.data import Corpus, check_length, epoch_order, load_corpus, n_windows, window_batches
from koopman_search.trainer.errors import CheckpointError, ConfigError
from koopman_search.trainer.koopman import KoopmanHeads, KoopmanMetrics
from koopman_search.trainer.linearity import LinearBlockModels, LinearScore, fit_linear
from koopman_search.trainer.lm_loss import lm_loss_and_hidden
from koopman_search.trainer.model import build_model, model_blocks
from koopman_search.trainer.records import K_EIGS_PER_BLOCK, EpochRecord
from koopman_search.trainer.schedule import FallbackState, koopman_weight

__all__ = ["CHECKPOINT_FORMAT", "EpochCallback", "HybridKoopmanTrainer", "StepCallback", "resolve_device"]

logger = logging.getLogger(__name__)

EpochCallback = Callable[[EpochRecord], "bool | None"]
StepCallback = Callable[[int, int, int, int], None]  # (epoch, epochs, steps done in it, its steps): inside an epoch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name} was asked for but CUDA is not available, but got device={name!r}; use device=auto or cpu"
        )
    return torch.device(name)


def _backbone_grad(ok: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The Koopman gradient as it enters the backbone: scaled by the batch's weight, dropped (not multiplied
    by 0, which keeps a NaN) when the batch's Koopman loss is non-finite."""
    return torch.where(ok, grad * weight, 0.0)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _mean_and_se(sums: list[float], counts: list[int]) -> tuple[float, float]:
    """The token-weighted mean of per-batch loss sums and its standard error, batches as clusters (the ratio
    estimator's: sqrt(B / (B - 1) · Σ (s_i − mean · n_i)²) / Σ n_i); NaN standard error under two batches."""
    n = sum(counts)
    mean = sum(sums) / n
    if len(sums) < 2:
        return mean, math.nan
    spread = sum((s - mean * c) ** 2 for s, c in zip(sums, counts, strict=True))
    return mean, math.sqrt(len(sums) / (len(sums) - 1) * spread) / n


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def _koopman_block_hook(
    heads: KoopmanHeads, layer: int, module: nn.Module, inputs: tuple[Any, ...], output: Any
) -> Any:
    """A forward hook that replaces block ``layer``'s output by ψ(K φ(input) + c)."""
    return heads.block_step(layer, inputs[0])


def _linear_block_hook(
    models: LinearBlockModels, layer: int, module: nn.Module, inputs: tuple[Any, ...], output: Any
) -> Any:
    """A forward hook that replaces block ``layer``'s output by its fitted linear model."""
    return models.block_step(layer, inputs[0])


class HybridKoopmanTrainer:
    """Trains a language model with the hybrid Koopman auxiliary loss. Knows nothing of Optuna."""

    def __init__(self, cfg: TrainerConfig, corpus: Corpus | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        d = cfg.data

        def long_enough(c: Corpus) -> None:
            check_length(c.train, d.seq_len, "train")
            check_length(c.valid, d.seq_len, "valid")

        corpus = corpus if corpus is not None else load_corpus(d.source, d.vocab_size, d.cache_dir, long_enough)
        long_enough(corpus)
        self.vocab_size = corpus.vocab_size
        self.corpus_fingerprint = corpus_fingerprint(corpus.vocab, (corpus.train, corpus.valid))
        # The token streams live on the device: batches are gathered there, no host→device copy per step.
        self.train_tokens = corpus.train.to(self.device)
        self.valid_tokens = corpus.valid.to(self.device)

        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, self.vocab_size, d.seq_len).to(self.device)
        self.koopman: KoopmanHeads | None = None
        if cfg.koopman.enabled:
            n_layers = int(getattr(self.model, "n_layers"))  # noqa: B009 - protocol attribute
            d_model = int(getattr(self.model, "d_model"))  # noqa: B009
            self.koopman = KoopmanHeads(cfg.koopman, d_model, n_layers, cfg.train.seed).to(self.device)
        t = cfg.train
        self.opt_lm = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.opt_koopman = (
            torch.optim.AdamW(self.koopman.parameters(), lr=t.lr, weight_decay=t.weight_decay)
            if self.koopman is not None
            else None
        )
        # Draws the tokens the Koopman loss is estimated on; used only in Koopman epochs.
        self.koopman_gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 7919)
        self.autocast = self.device.type == "cuda"  # bf16 autocast on CUDA only
        self.epoch = 0
        self.step = 0
        self._since_refit = 0
        self.records: list[EpochRecord] = []
        self.stopped = False
        self._on_step: StepCallback | None = None

    # ---- the loop -----------------------------------------------------------------------------------------
    def fit(
        self,
        callback: EpochCallback | None = None,
        checkpoint_dir: str | Path | None = None,
        on_step: StepCallback | None = None,
    ) -> list[EpochRecord]:
        """Train the remaining epochs. After each one, save ``epoch_{e}.pt`` and ``last.pt`` under
        ``checkpoint_dir`` (if given) and call ``callback(record)``; a true return value stops training.
        ``on_step(epoch, epochs, step, steps)`` follows the steps inside an epoch (after each; no device sync)."""
        self.stopped = False
        self._on_step = on_step
        for epoch in range(self.epoch + 1, self.cfg.train.epochs + 1):
            record = self._run_epoch(epoch)
            self.epoch = epoch
            self.records.append(record)
            if checkpoint_dir is not None:
                path = self.save_checkpoint(Path(checkpoint_dir) / f"epoch_{epoch}.pt")
                with path.open("rb") as src:
                    atomic_write(Path(checkpoint_dir) / "last.pt", lambda dst: shutil.copyfileobj(src, dst))
            if callback is not None and callback(record):
                self.stopped = True
                break
        return self.records

    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    def _train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        d = self.cfg.data
        order = epoch_order(n_windows(self.train_tokens.numel(), d.seq_len), self.cfg.train.seed, epoch)
        n_batches = len(order) // d.batch_size
        if self.cfg.train.max_steps_per_epoch:
            n_batches = min(n_batches, self.cfg.train.max_steps_per_epoch)
        order = order[: n_batches * d.batch_size].to(self.device)
        return window_batches(self.train_tokens, d.seq_len, d.batch_size, order, drop_last=True)

    def _sample_tokens(self, n_tokens: int) -> torch.Tensor | None:
        n = self.cfg.koopman.tokens_per_batch
        if n == 0 or n >= n_tokens:
            return None
        return torch.randint(0, n_tokens, (n,), device=self.device, generator=self.koopman_gen)

    def _run_epoch(self, epoch: int) -> EpochRecord:
        cfg, kc = self.cfg, self.cfg.koopman
        started = time.perf_counter()
        weight = koopman_weight(epoch, kc, cfg.train.epochs)
        koop = self.koopman if weight > 0 else None
        fallback = FallbackState(
            kc.fallback_threshold, kc.fallback_factor, kc.fallback_batches, self.device, kc.fallback_mode
        )
        self.model.train()
        if self.koopman is not None:
            self.koopman.train()
        # lm, koopman (finite batches only), total, effective weight: summed on the device
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        steps = 0
        bar = self._progress(epoch)
        on_step, planned = self._on_step, self._steps_per_epoch()
        for x, y in self._train_batches(epoch):
            sums += self._train_step(x, y, koop, weight, fallback)
            steps += 1
            if on_step is not None:
                on_step(epoch, cfg.train.epochs, steps, planned)
            if bar is not None:
                bar.update(1)
                if steps % 20 == 0:  # the only host syncs: for the progress bar, when there is one
                    bar.set_postfix(loss=f"{float(sums[2]) / steps:.4f}", refresh=False)
        if bar is not None:
            bar.close()
        # reading the sums waits for the device, so that the timing covers the epoch's queued GPU work too
        totals = sums.tolist()
        train_seconds = time.perf_counter() - started
        if steps == 0:
            raise ConfigError(
                f"an epoch has no training batch: the train split holds {self.train_tokens.numel()} tokens, "
                f"fewer than one batch of batch_size={cfg.data.batch_size} x seq_len={cfg.data.seq_len}"
            )
        cut, nonfinite = int(fallback.cut_count), int(fallback.nonfinite_count)
        self._warn_fallback(epoch, cut, nonfinite, steps)
        val = self.evaluate(koopman=koop is not None)
        return self._record(
            epoch, weight, koop is not None, totals, steps, (cut, nonfinite), val, started, train_seconds
        )

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor, koop: KoopmanHeads | None, weight: float, fallback: FallbackState
    ) -> torch.Tensor:
        """One optimizer step on one batch; returns its (LM loss, Koopman loss where finite, total loss,
        effective weight) as a float64 tensor on the device (no host sync)."""
        cfg, kc = self.cfg, self.cfg.koopman
        with self._autocast():
            lm_loss, hidden = lm_loss_and_hidden(self.model, x, y)  # fused head (trainer/lm_loss.py)
        finite: torch.Tensor | None = None
        if koop is not None:
            states = koop.gather(hidden, self._sample_tokens(x.numel()))  # (L+1, N, d)
            k_loss, x_phi, y_phi = koop.objective(states)
            w_eff = fallback.effective_weight(weight, k_loss)
            finite = torch.isfinite(k_loss)
            # The heads learn from the Koopman loss itself; the weight sets how much of its gradient
            # reaches the backbone (a hook on the states scales it there). With Adam the heads' steps
            # barely depend on a constant factor anyway, but at small weights their gradients would sit
            # near Adam's eps and stall (docs/koopman-objective.md). where(), not a multiply: 0 × NaN
            # would poison the gradient of the whole step.
            loss = lm_loss + torch.where(finite, k_loss, torch.zeros_like(k_loss))
            # where() hides a non-finite loss's value, not the NaN local derivatives behind it
            # (0 × NaN = NaN): drop the Koopman gradient where it enters the backbone, and the
            # heads' own gradients after backward, or one bad batch turns every weight into NaN.
            if states.requires_grad:
                states.register_hook(functools.partial(_backbone_grad, finite, w_eff))
            if kc.fit == "lstsq":
                koop.accumulate(x_phi, y_phi, keep=finite)
            shown_k = torch.where(finite, k_loss.detach(), 0.0)
            reported = lm_loss.detach() + w_eff * shown_k
            batch = torch.stack((lm_loss.detach().double(), shown_k.double(), reported.double(), w_eff.double()))
        else:
            loss = lm_loss
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            batch = torch.stack((lm_loss.detach().double(), zero, lm_loss.detach().double(), zero))
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)  # the notebook's 0.5
        self.opt_lm.step()
        if koop is not None and self.opt_koopman is not None and finite is not None:
            koop.drop_grads_unless(finite)
            nn.utils.clip_grad_norm_(koop.parameters(), cfg.train.grad_clip)  # clipped apart from the LM's
            self.opt_koopman.step()
            self.opt_koopman.zero_grad(set_to_none=True)
            if kc.fit == "dmd" and bool(finite):
                # the notebook's order: after the step, the refreshed φ on the step's (detached) states
                koop.dmd_update(koop.gather([h.detach() for h in hidden], None))
        self.opt_lm.zero_grad(set_to_none=True)
        self.step += 1
        if koop is not None and kc.fit == "lstsq":
            self._since_refit += 1
            if self._since_refit >= kc.update_interval:
                koop.refit()
                self._since_refit = 0
        return batch

    def _warn_fallback(self, epoch: int, cut: int, nonfinite: int, steps: int) -> None:
        """One warning per epoch at most; the counts also go into the record."""
        if not (cut or nonfinite):
            return
        kc = self.cfg.koopman
        logger.warning(
            "epoch %d: Koopman weight cut by the fallback on %d of %d batches (threshold %g%s)%s",
            epoch,
            cut,
            steps,
            kc.fallback_threshold,
            " standard deviations over the running mean" if kc.fallback_mode == "relative" else "",
            f"; Koopman loss non-finite on {nonfinite} batch(es), term off for the rest of the epoch"
            if nonfinite
            else "",
        )

    def _record(
        self,
        epoch: int,
        weight: float,
        koopman_on: bool,
        totals: list[float],
        steps: int,
        counts: tuple[int, int],
        val: dict[str, Any],
        started: float,
        train_seconds: float,
    ) -> EpochRecord:
        """The epoch's record from its training sums (lm, koopman, total, weight), its fallback counts (cut,
        non-finite) and its validation metrics."""
        cfg = self.cfg
        lm, k_sum, total, w_sum = totals
        cut, nonfinite = counts
        finite_batches = steps - nonfinite
        val_loss = val["val_loss"]
        heads = self.koopman if koopman_on else None
        radius, eig_re, eig_im = heads.k_spectrum(K_EIGS_PER_BLOCK) if heads is not None else (math.nan, [], [])
        return EpochRecord(
            epoch=epoch,
            epochs=cfg.train.epochs,
            lm_loss=lm / steps,
            koopman_loss=k_sum / finite_batches if koopman_on and finite_batches else 0.0,
            total_loss=total / steps,
            koopman_weight=weight,
            effective_weight=w_sum / steps,
            fallback_batches=cut,
            nonfinite_batches=nonfinite,
            val_loss=val_loss,
            val_ppl=_ppl(val_loss),
            val_koopman_nre=val["val_koopman_nre"],
            val_koopman_gain=val["val_koopman_gain"],
            val_koopman_gain_blocks=val["val_koopman_gain_blocks"],
            phi_effective_rank=val["phi_effective_rank"],
            state_effective_rank=val["state_effective_rank"],
            val_koopman_forward_ppl=val["val_koopman_forward_ppl"],
            phi_rank_ratio=val["phi_rank_ratio"],
            phi_scale=val["phi_scale"],
            val_linear_nre=val["val_linear_nre"],
            val_linear_nre_blocks=val["val_linear_nre_blocks"],
            val_linear_ppl=val["val_linear_ppl"],
            val_linear_ppl_ratio=_ratio(val["val_linear_ppl"], _ppl(val_loss)),
            val_loss_se=val["val_loss_se"],
            koopman_k_norm=heads.k_norm() if heads is not None else math.nan,
            koopman_k_radius=radius,
            koopman_k_eig_re=eig_re,
            koopman_k_eig_im=eig_im,
            seconds=time.perf_counter() - started,
            tokens_per_s=steps * cfg.data.batch_size * cfg.data.seq_len / train_seconds,
            steps=steps,
        )

    def _progress(self, epoch: int) -> Any:
        if not self.cfg.train.progress:
            return None
        from tqdm import tqdm

        total = self._steps_per_epoch()
        return tqdm(total=total, desc=f"epoch {epoch}/{self.cfg.train.epochs}", unit="step", leave=False)

    def _steps_per_epoch(self) -> int:
        d = self.cfg.data
        total = n_windows(self.train_tokens.numel(), d.seq_len) // d.batch_size
        if self.cfg.train.max_steps_per_epoch:
            total = min(total, self.cfg.train.max_steps_per_epoch)
        return total

    @torch.no_grad()
    def evaluate(self, koopman: bool = True) -> dict[str, Any]:
        """The validation metrics: ``val_loss`` (token-weighted cross-entropy; the notebook took exp of a mean
        of per-batch losses, here every validation token counts once) and, when ``koopman`` is on and the
        heads exist, ``val_koopman_nre``, ``val_koopman_gain`` (mean and ``_blocks``), ``phi_effective_rank``
        and, for an objective with a decoder, ``val_koopman_forward_ppl`` (NaN where they do not apply).
        """
        self.model.eval()
        heads = self.koopman if koopman else None
        metrics = KoopmanMetrics() if heads is not None else None
        linear = self._fit_linear() if self.cfg.train.linear_fit_tokens else None
        score = LinearScore(linear) if linear is not None else None
        val_loss, val_loss_se = self._val_loss_with_se(metrics, score)
        out: dict[str, Any] = {
            "val_loss": val_loss,
            "val_loss_se": val_loss_se,
            "val_koopman_nre": math.nan,
            "val_koopman_gain": math.nan,
            "val_koopman_gain_blocks": [],
            "phi_effective_rank": math.nan,
            "state_effective_rank": math.nan,
            "val_koopman_forward_ppl": math.nan,
            "phi_rank_ratio": math.nan,
            "phi_scale": math.nan,
            "val_linear_nre": math.nan,
            "val_linear_nre_blocks": [],
            "val_linear_ppl": math.nan,
        }
        if score is not None and linear is not None:
            out["val_linear_nre_blocks"] = score.per_block()
            out["val_linear_nre"] = score.value()
            out["val_linear_ppl"] = self._replaced_ppl(functools.partial(_linear_block_hook, linear))
        if metrics is not None:
            means = metrics.values()
            out.update(
                val_koopman_nre=means["nre"],
                val_koopman_gain=means["gain"],
                val_koopman_gain_blocks=metrics.per_block()["gain"],
                phi_effective_rank=means["effective_rank"],
                state_effective_rank=means["state_effective_rank"],
                phi_rank_ratio=means["rank_ratio"],
                phi_scale=means["scale"],
            )
        if heads is not None and heads.has_decoder:
            out["val_koopman_forward_ppl"] = self._replaced_ppl(functools.partial(_koopman_block_hook, heads))
        return out

    def _replaced_ppl(self, hook: Callable[..., Any]) -> float:
        """Val perplexity with every block's output replaced by ``hook(layer, module, inputs, output)``; NaN
        for a model whose blocks cannot be found."""
        blocks = model_blocks(self.model)
        if blocks is None:
            return math.nan
        handles = [b.register_forward_hook(functools.partial(hook, i)) for i, b in enumerate(blocks)]
        try:
            return _ppl(self._val_loss(None))
        finally:
            for handle in handles:
                handle.remove()

    def _hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The model's hidden states on a batch, without building its logits where the model allows."""
        head_inputs = getattr(self.model, "lm_head_inputs", None)
        with self._autocast():
            if callable(head_inputs):
                return list(head_inputs(x)[1])
            return list(self.model(x)[1])

    def _fit_linear(self) -> LinearBlockModels:
        """Fit the linear replacement of every block (trainer/linearity.py) on ``train.linear_fit_tokens``
        training tokens: windows spread evenly over the train split, the same in every epoch and trial."""
        d = self.cfg.data
        total = n_windows(self.train_tokens.numel(), d.seq_len)
        n = max(1, min(total, math.ceil(self.cfg.train.linear_fit_tokens / d.seq_len)))
        order = torch.linspace(0, total - 1, n, device=self.device).round().long()
        chunks = []
        for x, _ in window_batches(self.train_tokens, d.seq_len, d.batch_size, order, drop_last=False):
            chunks.append(torch.stack(self._hidden(x)).flatten(1, 2).float())  # (L+1, B*T, d)
        states = torch.cat(chunks, dim=1)
        return fit_linear(states[:-1], states[1:])

    def _val_loss(self, metrics: KoopmanMetrics | None, linear: LinearScore | None = None) -> float:
        """Token-weighted validation cross-entropy; feeds ``metrics`` with the heads' view of every token."""
        return self._val_loss_with_se(metrics, linear)[0]

    def _val_loss_with_se(
        self, metrics: KoopmanMetrics | None, linear: LinearScore | None = None
    ) -> tuple[float, float]:
        """(token-weighted validation cross-entropy, its standard error over the batches: the ratio estimator's,
        each batch a cluster; NaN under two batches). Feeds ``metrics`` with the heads' view of every token."""
        d = self.cfg.data
        sums: list[torch.Tensor] = []  # per batch, on the device: one transfer at the end, no sync per batch
        counts: list[int] = []
        limit = self.cfg.train.max_eval_batches
        for i, (x, y) in enumerate(window_batches(self.valid_tokens, d.seq_len, d.batch_size, None, drop_last=False)):
            if limit and i >= limit:
                break
            with self._autocast():
                loss_sum, hidden = lm_loss_and_hidden(self.model, x, y, reduction="sum")
            sums.append(loss_sum.double())
            counts.append(y.numel())
            if metrics is not None and self.koopman is not None:
                states = self.koopman.gather(hidden, None)  # (L+1, N, d)
                x_phi, y_phi = self.koopman.lift_pairs(states)
                metrics.update(x_phi, y_phi, self.koopman.advance(x_phi), states[1:])
            if linear is not None:
                states = torch.stack(hidden).flatten(1, 2).float()  # (L+1, N, d)
                linear.update(states[:-1], states[1:])
        return _mean_and_se(torch.stack(sums).cpu().tolist() if sums else [], counts)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "koopman": self.koopman_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "epoch": self.epoch,
            "step": self.step,
            "since_refit": self._since_refit,
            "vocab_size": self.vocab_size,
            "corpus": self.corpus_fingerprint,
            "model": self.model.state_dict(),
            "opt_lm": self.opt_lm.state_dict(),
            "koopman": self.koopman.state_dict() if self.koopman is not None else None,
            "opt_koopman": self.opt_koopman.state_dict() if self.opt_koopman is not None else None,
            "rng": rng,
            "records": [r.to_dict() for r in self.records],
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Everything needed to resume exactly; written atomically (temp file, then rename)."""
        state = self.state_dict()
        return atomic_write(path, lambda fh: torch.save(state, fh))

    read_checkpoint = staticmethod(read_checkpoint)

    def _load_backbone(self, state: dict[str, Any], path: str | Path) -> None:
        if state["vocab_size"] != self.vocab_size:
            raise CheckpointError(
                f"checkpoint {path} has vocab_size {state['vocab_size']}, this corpus gives {self.vocab_size}"
            )
        if state.get("corpus", self.corpus_fingerprint) != self.corpus_fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was trained on another corpus (fingerprint {state['corpus']}, this "
                f"corpus {self.corpus_fingerprint}): same data.source path, different content?"
            )
        self.model.load_state_dict(state["model"])
        self.opt_lm.load_state_dict(state["opt_lm"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.records = [EpochRecord.from_dict(r) for r in state["records"]]

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, cfg: TrainerConfig | None = None, corpus: Corpus | None = None
    ) -> HybridKoopmanTrainer:
        """Resume exactly where ``path`` stopped. ``cfg`` (optional) must compute the same thing; only
        where it runs (device, progress bar) may differ."""
        state = cls.read_checkpoint(path)
        saved = config_from_dict(state["config"], origin=str(path))
        if cfg is None:
            cfg = saved
        else:
            diff = config_diff(saved, cfg, ("data", "model", "koopman", "train"))
            if diff:
                raise CheckpointError(f"checkpoint {path} was made with another config: {'; '.join(diff)}")
        trainer = cls(cfg, corpus)
        trainer._load_backbone(state, path)
        if trainer.koopman is not None and state["koopman"] is not None:
            trainer.koopman.load_state_dict(state["koopman"])
            if trainer.opt_koopman is not None and state["opt_koopman"] is not None:
                trainer.opt_koopman.load_state_dict(state["opt_koopman"])
        trainer.koopman_gen.set_state(state["rng"]["koopman"])
        trainer._since_refit = int(state["since_refit"])
        return trainer

    def warm_start_from(self, path: str | Path) -> None:
        """Start from a Koopman-off (baseline) checkpoint of epoch e <= start_epoch: its backbone, optimizer,
        RNG and records 1..e; the Koopman heads stay freshly initialised. Equivalent to training epochs
        1..e from scratch (those are pure LM epochs, identical for every Koopman setting)."""
        state = self.read_checkpoint(path)
        saved = config_from_dict(state["config"], origin=str(path))
        if saved.koopman.enabled:
            raise CheckpointError(
                f"warm start needs a Koopman-off (baseline) checkpoint, but {path} has koopman.enabled = true"
            )
        diff = config_diff(saved, self.cfg, ("data", "model", "train"))
        if diff:
            raise CheckpointError(f"baseline checkpoint {path} was made with another config: {'; '.join(diff)}")
        if state["epoch"] > self.cfg.koopman.start_epoch:
            raise CheckpointError(
                f"warm start from epoch {state['epoch']} is past koopman.start_epoch="
                f"{self.cfg.koopman.start_epoch}: epochs after the start epoch are not pure LM training"
            )
        if self.epoch:
            raise CheckpointError("warm start must come before any training")
        self._load_backbone(state, path)
