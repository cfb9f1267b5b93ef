"""The built-in model with a pause in every training step, plugged in with
``model.factory = "tests.search.slow_model:build"``.

Worker tests kill or stop a process in the middle of a trial; the pause (``KOOPMAN_TEST_STEP_SECONDS``,
default 0.05 s) gives every epoch a known minimum length on any machine. The numbers it computes are the
built-in model's, unchanged.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from koopman_search.trainer.config import ModelConfig
from koopman_search.trainer.model import TransformerLM

STEP_SECONDS_ENV = "KOOPMAN_TEST_STEP_SECONDS"


class SlowLM(TransformerLM):
    # the trainer's fused LM loss calls lm_head_inputs, not forward (trainer/lm_loss.py); forward calls it too
    def lm_head_inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        if self.training:
            time.sleep(float(os.environ.get(STEP_SECONDS_ENV, "0.05")))
        return super().lm_head_inputs(idx)


def build(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    return SlowLM(cfg, vocab_size, seq_len)
