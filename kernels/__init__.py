"""Attention kernels that return per-head statistics as a by-product.

Installed as ``lightning_icl.kernels``. Nothing here imports Lightning.

- :mod:`.attention`: ``capture_attention``, the entry point, which checks its inputs and picks a backend;
- :mod:`.triton_attention`: the fused Triton kernels, registered as ``torch.library`` ops in :mod:`.custom_ops`;
- :mod:`.torch_attention`: the torch backend (``capture_attention_torch``: SDPA and one statistics pass);
- :mod:`.naive`: attention and its statistics by definition in float64 (``naive_attention``), what the
  backends are tested against.
"""

from .attention import (
    BACKENDS,
    SUPPORTED_HEAD_DIMS,
    SUPPORTED_STATS,
    attention_probability,
    capture_attention,
    check_head_dim,
)
from .naive import naive_attention
from .torch_attention import capture_attention_torch

__all__ = [
    "BACKENDS",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_STATS",
    "attention_probability",
    "capture_attention",
    "capture_attention_torch",
    "check_head_dim",
    "naive_attention",
]
