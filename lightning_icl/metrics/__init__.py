"""Metrics: functional cores and torchmetrics classes (DDP-synced)."""

from .shots import PerShotMean, per_shot_mean

__all__ = ["PerShotMean", "per_shot_mean"]
