"""Metrics: functional cores (``lightning_icl.metrics.functional``) and torchmetrics classes (DDP-synced)."""

from . import functional
from .decodability import KNNDecodability
from .shots import PerShotMean, per_shot_mean

__all__ = ["KNNDecodability", "PerShotMean", "functional", "per_shot_mean"]
