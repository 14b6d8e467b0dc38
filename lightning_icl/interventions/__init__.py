"""Interventions on heads and MLPs, during or after training.

- :mod:`~lightning_icl.interventions.gating`: the rule ``g * z + (1 - g) * mu`` every
  intervention goes through, its checks, and the rule as hooks on the model's hook points.
- :mod:`~lightning_icl.interventions.shared_pass`: the clean run and many gated variants in one pass.
- :mod:`~lightning_icl.interventions.ablation`: every head ablated in turn, batched.
- :mod:`~lightning_icl.interventions.attribution`: gate-gradient estimates of ablation.
- :mod:`~lightning_icl.interventions.patching`: concept patching and function vectors.
"""

from .ablation import AblationResult, ablate_with, ablation_effects, head_means
from .attribution import ATTRIBUTION_METHODS, gate_gradients, head_attribution
from .gating import ABLATIONS, check_ablation_mode, gate_heads, gate_mlp, gating_hooks
from .shared_pass import shared_ablation_pass

__all__ = [
    "ABLATIONS",
    "ATTRIBUTION_METHODS",
    "AblationResult",
    "ablate_with",
    "ablation_effects",
    "check_ablation_mode",
    "gate_gradients",
    "gate_heads",
    "gate_mlp",
    "gating_hooks",
    "head_attribution",
    "head_means",
    "shared_ablation_pass",
]
