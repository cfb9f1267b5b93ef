"""Probes of the Koopman objective on a frozen backbone: train the heads alone and watch for collapse.

A frozen backbone isolates what the objective does to φ: the states h are fixed, so any fall of the loss
comes from the heads. The notebook's latent-only loss falls by shrinking φ toward a constant (its centred
scale goes to 0) or by concentrating it in one direction (its participation ratio goes to 1); a well-posed
objective cannot (docs/koopman-objective.md). Used by the tests and by ``bench/bench_koopman_objective.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from koopman_search.trainer.koopman import KoopmanMetrics
from koopman_search.trainer.loop import HybridKoopmanTrainer

__all__ = ["PROBE", "ProbePoint", "frozen_backbone_probe", "state_effective_rank"]

# The probe's setting, shared by tests/trainer/test_probe.py and bench/bench_koopman_objective.py: a small
# freshly initialised backbone on the builtin corpus, every token of each 8 × 32 batch seen by the heads.
PROBE = {
    "data.source": "builtin",
    "data.vocab_size": 2000,
    "data.seq_len": 32,
    "data.batch_size": 8,
    "model.d_model": 32,
    "model.n_layers": 2,
    "train.epochs": 2,
    "koopman.start_epoch": 1,
    "train.max_steps_per_epoch": 30,
    "train.device": "cpu",
    "koopman.dim": 32,
    "koopman.tokens_per_batch": 0,
}


@dataclass(frozen=True)
class ProbePoint:
    step: int
    loss: float  # the training objective on the last batch
    phi_effective_rank: float  # participation ratio of the centred φ(h_out) on the probe batches, mean over blocks
    phi_scale: float  # RMS of the centred φ(h_out), mean over blocks
    identity_loss: float  # the same objective with K = I (and c = 0)
    nre: float
    gain: float


@torch.no_grad()
def _measure(trainer: HybridKoopmanTrainer, batches: list[torch.Tensor]) -> tuple[float, float, float, float, float]:
    heads = trainer.koopman
    assert heads is not None
    metrics = KoopmanMetrics()
    sq = torch.zeros(heads.kt.shape[0], dtype=torch.float64)
    s = torch.zeros(heads.kt.shape[0], heads.kt.shape[-1], dtype=torch.float64)
    n = 0
    id_loss = 0.0
    kt, kb = heads.kt.detach().clone(), heads.kb.detach().clone()
    for x in batches:
        _, hidden = trainer.model(x)
        states = heads.gather(hidden, None)
        xp, yp = heads.lift_pairs(states)
        metrics.update(xp, yp, heads.advance(xp), states[1:])
        sq += yp.double().pow(2).sum((1, 2))
        s += yp.double().sum(1)
        n += yp.shape[1]
        heads.kt.copy_(torch.eye(kt.shape[-1]).expand_as(kt))
        heads.kb.zero_()
        id_loss += float(heads.objective(states)[0])
        heads.kt.copy_(kt)
        heads.kb.copy_(kb)
    v = metrics.values()
    scale = float(((sq - s.pow(2).sum(-1) / n) / (n * s.shape[-1])).sqrt().mean())
    return v["effective_rank"], scale, id_loss / len(batches), v["nre"], v["gain"]


def frozen_backbone_probe(
    trainer: HybridKoopmanTrainer, steps: int, every: int, probe_batches: int = 2, lr: float | None = None
) -> list[ProbePoint]:
    """Train ``trainer``'s Koopman heads alone for ``steps`` steps on its training batches (the backbone in
    eval mode, no gradient to it) and measure every ``every`` steps on the first ``probe_batches`` batches of
    the validation split. K is trained by gradient (``koopman.fit`` must be ``"gradient"``)."""
    heads = trainer.koopman
    if heads is None or trainer.cfg.koopman.fit != "gradient":
        raise ValueError("the probe needs Koopman heads with koopman.fit = 'gradient'")
    trainer.model.eval()
    for p in trainer.model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(
        heads.parameters(), lr=lr or trainer.cfg.train.lr, weight_decay=trainer.cfg.train.weight_decay
    )
    d = trainer.cfg.data
    valid = trainer.valid_tokens
    n_val = (valid.numel() - 1) // d.seq_len
    probe = [valid[i * d.seq_len : (i + 1) * d.seq_len].view(1, -1) for i in range(min(n_val, probe_batches * 4))]
    probe_x = [torch.cat(probe[i : i + 4]) for i in range(0, len(probe), 4)]
    points: list[ProbePoint] = []
    step = 0
    loss = math.nan
    while step < steps:
        for x, _ in trainer._train_batches(trainer.epoch + 1):
            if step % every == 0:
                points.append(ProbePoint(step, loss, *_measure(trainer, probe_x)))
            with torch.no_grad():
                _, hidden = trainer.model(x)
            states = heads.gather(hidden, trainer._sample_tokens(x.numel()))
            k_loss = heads.objective(states)[0]
            k_loss.backward()
            nn.utils.clip_grad_norm_(heads.parameters(), trainer.cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(k_loss.detach())
            step += 1
            if step >= steps:
                break
    points.append(ProbePoint(step, loss, *_measure(trainer, probe_x)))
    return points


@torch.no_grad()
def state_effective_rank(trainer: HybridKoopmanTrainer, batches: int = 2) -> float:
    """Participation ratio of the centred block outputs h_out themselves (mean over blocks): the ceiling a
    faithful φ is compared against."""
    d = trainer.cfg.data
    x = trainer.valid_tokens[: batches * 4 * d.seq_len].view(-1, d.seq_len)
    _, hidden = trainer.model(x)
    h = torch.stack(hidden[1:]).flatten(1, 2).double()  # (L, N, d)
    h = h - h.mean(1, keepdim=True)
    cov = h.transpose(1, 2) @ h
    tr = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    return float((tr.pow(2) / cov.pow(2).sum((1, 2))).mean())
