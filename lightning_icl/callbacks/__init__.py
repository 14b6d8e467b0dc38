"""Interpretability callbacks: drop into any Trainer; see :class:`ICLCallback` for the shared options."""

from .attention import AttentionStatistics
from .base import ICLCallback
from .curves import ICLCurves
from .decodability import ConceptDecodability
from .heads import HeadAblation, HeadAttribution

__all__ = ["AttentionStatistics", "ConceptDecodability", "HeadAblation", "HeadAttribution", "ICLCallback", "ICLCurves"]
