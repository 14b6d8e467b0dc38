"""Metrics: functional cores (``lightning_icl.metrics.functional``) and torchmetrics classes (DDP-synced)."""

from . import functional
from .decodability import ConceptDecodability
from .shots import PerShotMean, per_shot_mean

__all__ = ["ConceptDecodability", "PerShotMean", "functional", "per_shot_mean"]
