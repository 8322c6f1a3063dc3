"""Learning-rate schedule: linear warmup (optional, default none), then cosine decay to 0."""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The multiplier of the peak LR for optimizer step `step` (0-based; the step about to run).

    Warmup ramps 1/w, 2/w, ... 1 so the first step never uses LR 0; the cosine then falls
    so that the last step is small but not 0 (the LR after the last step is exactly 0).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepping once per optimizer step; its state_dict goes into checkpoints."""
    warmup = int(round(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
