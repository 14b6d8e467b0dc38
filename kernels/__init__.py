"""Attention kernels that return per-head statistics as a by-product.

Installed as ``lightning_icl.kernels``. Nothing here imports Lightning.
"""

from .attention import (
    BACKENDS,
    SUPPORTED_HEAD_DIMS,
    SUPPORTED_STATS,
    attention_probability,
    capture_attention,
    check_head_dim,
)
from .torch_attention import capture_attention_torch

__all__ = [
    "BACKENDS",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_STATS",
    "attention_probability",
    "capture_attention",
    "capture_attention_torch",
    "check_head_dim",
]
