"""Optimiser, learning-rate schedule and dropout for ``pauserec.train.sft`` (torch imported lazily).

* ``make_optimizer``: AdamW; weight decay on matrices (linear layers, the tied embedding), none on the
  1-D parameters (RMSNorm scales, biases), as in GPT-2/nanoGPT.
* ``lr_at``: by steps. Linear warm-up from 0.1x to 1x the peak over ``warmup_steps``, then cosine decay to
  ``FLOOR`` x the peak at ``decay_steps``, then constant at the floor (so ``--epochs`` is only a ceiling:
  a longer run does not stretch the schedule). With a time budget that would end the run first, the decay
  follows the share of the budget used instead, so a budget-capped run still ends on a low learning rate.
* ``residual_dropout``: dropout on the output of every attention output projection and MLP down
  projection (before the residual add; GPT-2's resid_pdrop), installed as forward hooks for the stage only,
  so the model's weights, config and export are unchanged; inactive in eval mode.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

FLOOR = 0.1  # lr at the end of the decay, as a share of the peak
DROPOUT_MODULES = ("self_attn.o_proj", "mlp.down_proj")  # Qwen3, Qwen2, Llama


def make_optimizer(params, lr: float, weight_decay: float):
    """AdamW over ``params`` (a list of tensors): decay on tensors with >= 2 dims only."""
    import torch

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=lr)


def lr_at(step: int, peak: float, warmup_steps: int, decay_steps: int, time_share: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based); ``time_share``: share of a time budget used."""
    if step < warmup_steps:
        return peak * (0.1 + 0.9 * step / warmup_steps)
    t = (step - warmup_steps) / max(decay_steps - warmup_steps, 1)
    t = min(max(t, time_share), 1.0)
    return peak * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * t)))


@contextmanager
def residual_dropout(model, p: float):
    """Dropout ``p`` on the sublayer outputs while the context is open (training mode only)."""
    if p <= 0:
        yield 0
        return
    import torch.nn.functional as F

    def hook(module, _inputs, output):
        return F.dropout(output, p, module.training)

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if name.endswith(DROPOUT_MODULES)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()
