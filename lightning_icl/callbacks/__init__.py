"""Interpretability callbacks: drop into any Trainer; see :class:`ICLCallback` for the shared options."""

from .ablation import HeadAblation
from .attention import AttentionStatistics
from .attribution import HeadAttribution
from .base import ICLCallback
from .circuits import CircuitOverlap
from .curves import ICLCurves
from .decodability import ConceptDecodability
from .patching import ConceptPatching
from .peak import OODPeakCheckpoint

__all__ = [
    "AttentionStatistics",
    "CircuitOverlap",
    "ConceptDecodability",
    "ConceptPatching",
    "HeadAblation",
    "HeadAttribution",
    "ICLCallback",
    "ICLCurves",
    "OODPeakCheckpoint",
]
