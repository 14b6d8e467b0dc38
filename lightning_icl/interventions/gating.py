"""The gating rule every intervention on a head or an MLP goes through.

A head h of a layer contributes ``g_h * z_h + (1 - g_h) * mu_h`` to its output projection
(z: the head's output, the projection's input); an MLP adds ``g * m + (1 - g) * mu`` to the
residual stream. ``mu`` is zero, a mean output, or another example's output (resample).
Ablation (``g = 0``), partial ablation, attribution (gradients in ``g``) and pruning masks
are all values of ``g``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gate_heads(z: Tensor, gate: Tensor, ablate_with: str | Tensor | None, group: int | None = None) -> Tensor:
    """``g * z + (1 - g) * mu`` per head on z ``[B, H, T, Dh]``; gate ``[H]`` or ``[B, H]``.

    ``ablate_with`` (mu): ``None``/``"zero"``, ``"resample"`` (the previous example's z) or a
    mean ``[H, Dh]`` / ``[H, T, Dh]``. Every adapter gates through this one rule. ``group``:
    for a batch made of copies of one batch of ``group`` rows, resample within each copy.
    """
    g = gate.to(z.dtype).reshape(-1 if gate.dim() == 2 else 1, z.shape[1], 1, 1)
    if is_zero(ablate_with):
        return g * z
    return g * z + (1 - g) * ablation_value(z, ablate_with, group)


def is_zero(ablate_with: str | Tensor | None) -> bool:
    return ablate_with is None or (isinstance(ablate_with, str) and ablate_with == "zero")


def ablation_value(z: Tensor, ablate_with: str | Tensor | None, group: int | None = None) -> Tensor:
    """The ``mu`` of :func:`gate_heads` for z ``[B, H, T, Dh]``, broadcastable to z."""
    if is_zero(ablate_with):
        return torch.zeros_like(z)
    if isinstance(ablate_with, str):  # "resample": each example takes its neighbour's head outputs
        rows = z.shape[0] if group is None else group
        return torch.roll(z.unflatten(0, (-1, rows)), shifts=1, dims=1).flatten(0, 1)
    mu = ablate_with.to(z.dtype)  # a mean per head, [H, Dh] or per position [H, T, Dh]
    return mu[:, None, :] if mu.dim() == 2 else mu[:, : z.shape[2]]


def gate_mlp(m: Tensor, gate: Tensor, ablate_with: Tensor | None) -> Tensor:
    """``g * m + (1 - g) * mu`` on an MLP output m ``[B, T, D]``; gate a scalar or ``[B]``, mu ``[D]`` or ``[T, D]``."""
    g = gate.to(m.dtype).reshape(-1, 1, 1)  # [B or 1, 1, 1]
    if ablate_with is None:
        return g * m
    mu = ablate_with.to(m.dtype)
    mu = mu if mu.dim() == 1 else mu[: m.shape[1]]  # [D] or [T, D], broadcast over the batch
    return g * m + (1 - g) * mu
