"""Learning-rate schedules of the released recipe, as transformers' Trainer computes them.

The multiplier of optimizer step `step` (0-based: the first step uses step 0): linear warmup
step / warmup, then cosine decay over the remaining steps; cosine_with_min_lr decays to min_lr
instead of 0 (the released pretraining: lr 1e-4, min 1e-5, warmup ratio 0.003), cosine to 0 (the
released instruction tuning), constant keeps lr after the warmup.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float, warmup_steps: int | None = None) -> int:
    return int(warmup_steps) if warmup_steps is not None else math.ceil(total_steps * warmup_ratio)


def learning_rate(step: int, *, lr: float, total_steps: int, warmup: int, schedule: str, min_lr: float = 0.0) -> float:
    if step < warmup:
        return lr * step / max(1, warmup)
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "cosine":
        return lr * cosine
    if schedule == "cosine_with_min_lr":
        return min_lr + (lr - min_lr) * cosine
    raise ValueError(f"unknown schedule {schedule!r}: cosine_with_min_lr | cosine | constant")
