"""Optimizer parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_icl.checks import check_choice, check_number

if TYPE_CHECKING:
    from lightning_icl.config import OptimizerConfig

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


def configure_adamw(model: nn.Module, config: OptimizerConfig, max_steps: int | None) -> dict:
    """What ``configure_optimizers`` returns for ``config``: AdamW over :func:`decay_groups` and its
    per-step schedule, over a run of ``max_steps`` (``trainer.max_steps``; ``None`` or < 1: unbounded).

    The update is PyTorch's fused AdamW when ``config.fused`` says so (``None``: when every parameter
    is on CUDA). Raises ``ValueError`` when the warm-up is longer than the run, or when the cosine has no length.
    """
    groups = decay_groups(model, config.weight_decay)
    fused = config.fused
    if fused is None:
        params = [p for group in groups for p in group["params"]]
        fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused)
    if max_steps is not None and max_steps > 0 and config.warmup_steps > max_steps:
        raise ValueError(
            f"warmup_steps={config.warmup_steps} is longer than the run, trainer.max_steps={max_steps}: the learning "
            "rate would never reach lr; lower warmup_steps or raise max_steps"
        )
    total = config.total_steps or max_steps
    if config.schedule == "cosine" and (total is None or total < 1):
        raise ValueError("the cosine schedule needs total_steps or trainer.max_steps")
    factor = partial(
        lr_factor,
        warmup_steps=config.warmup_steps,
        total_steps=total or 1,
        warmup_start_factor=config.warmup_start_factor,
        min_lr_factor=config.min_lr_factor,
        schedule=config.schedule,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
