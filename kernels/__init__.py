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
from .reference import attention_reference

__all__ = [
    "BACKENDS",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_STATS",
    "attention_probability",
    "attention_reference",
    "capture_attention",
    "check_head_dim",
]
