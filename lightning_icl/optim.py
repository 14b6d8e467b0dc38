"""Optimizer parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

from torch import nn

from lightning_icl.checks import check_choice, check_number

SCHEDULES = ("cosine", "constant")


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, warmup_start_factor: float, min_lr_factor: float, schedule: str
) -> float:
    """Multiplier of the base learning rate at ``step``.

    Linear warm-up from ``warmup_start_factor`` to 1 over ``warmup_steps``, then
    cosine decay to ``min_lr_factor`` at ``total_steps`` (or constant 1).
    """
    check_choice("schedule", schedule, SCHEDULES)
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_factor + (1.0 - min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings included), none on norms and biases."""
    check_number("weight_decay", weight_decay, low=0.0)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
