"""Interpretability callbacks: drop into any Trainer; see :class:`ICLCallback` for the shared options."""

from .attention import AttentionStatistics
from .base import ICLCallback
from .circuits import CircuitOverlap
from .curves import ICLCurves
from .decodability import ConceptDecodability
from .heads import HeadAblation, HeadAttribution
from .patching import ConceptPatching

__all__ = [
    "AttentionStatistics",
    "CircuitOverlap",
    "ConceptDecodability",
    "ConceptPatching",
    "HeadAblation",
    "HeadAttribution",
    "ICLCallback",
    "ICLCurves",
]
