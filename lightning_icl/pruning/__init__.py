"""Pruned subnetworks of a trained model and their heuristic core (Bhaskar et al. 2024).

- :mod:`~lightning_icl.pruning.masks`: :class:`HardConcrete`, the L0 gate distribution.
- :mod:`~lightning_icl.pruning.module`: :class:`SubnetworkPruning`, the LightningModule that
  learns masks over the heads and MLPs of a frozen model.
- :mod:`~lightning_icl.pruning.core`: keep frequency, heuristic core, effective size and the
  report of a sweep.
- :mod:`~lightning_icl.pruning.cli`: ``lightning-icl prune`` and ``lightning-icl core``.
"""

from .core import effective_size, heuristic_core, keep_frequency, summarize_runs, write_core_report
from .masks import HardConcrete
from .module import DIVERGENCES, WEIGHTINGS, SubnetworkPruning

__all__ = [
    "DIVERGENCES",
    "WEIGHTINGS",
    "HardConcrete",
    "SubnetworkPruning",
    "effective_size",
    "heuristic_core",
    "keep_frequency",
    "summarize_runs",
    "write_core_report",
]
