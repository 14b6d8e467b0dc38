"""Interventions on heads and MLPs, during or after training.

- :mod:`~lightning_icl.interventions.gating`: the rule ``g * z + (1 - g) * mu`` every
  intervention goes through.
- :mod:`~lightning_icl.interventions.ablation`: every head ablated in turn, batched.
- :mod:`~lightning_icl.interventions.attribution`: gate-gradient estimates of ablation.
- :mod:`~lightning_icl.interventions.patching`: concept patching and function vectors.
"""

from .ablation import ABLATIONS, AblationResult, ablate_with, ablation_effects, head_means
from .attribution import ATTRIBUTION_METHODS, gate_gradients, head_attribution
from .gating import gate_heads, gate_mlp

__all__ = [
    "ABLATIONS",
    "ATTRIBUTION_METHODS",
    "AblationResult",
    "ablate_with",
    "ablation_effects",
    "gate_gradients",
    "gate_heads",
    "gate_mlp",
    "head_attribution",
    "head_means",
]
