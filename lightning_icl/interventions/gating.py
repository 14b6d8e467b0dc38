"""The gating rule every intervention on a head or an MLP goes through.

A head h of a layer contributes ``g_h * z_h + (1 - g_h) * mu_h`` to its output projection
(z: the head's output, the projection's input); an MLP adds ``g * m + (1 - g) * mu`` to the
residual stream. ``mu`` is zero, a mean output, or another example's output (resample).
Ablation (``g = 0``), partial ablation, attribution (gradients in ``g``) and pruning masks
are all values of ``g``.

This module also holds the checks every caller shares (gate shapes, ``mu``, ablation modes) and
:func:`gating_hooks`, the rule as hooks on the hook points ``blocks.{l}.attn.hook_z`` and
``blocks.{l}.hook_mlp_out`` (see :mod:`lightning_icl.hooks`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from lightning_icl.checks import check_choice
from lightning_icl.hooks import HookFn

ABLATIONS = ("zero", "mean", "resample")
"""How an ablated unit's output is replaced: by zero, its mean output, or another example's output."""


def check_ablation_mode(mode: str, name: str = "mode") -> None:
    """``mode`` is one of :data:`ABLATIONS`."""
    check_choice(name, mode, ABLATIONS)


def check_head_gates(
    gates: Tensor | None, n_layers: int, n_heads: int, batch: int | None, name: str = "head_gates"
) -> None:
    """Head gates are ``[L, H]`` or per example ``[B, L, H]`` (``batch=None``: ``[L, H]`` only;
    ``gates=None``: no gating)."""
    if gates is None:
        return
    lh, shape = (n_layers, n_heads), tuple(gates.shape)
    if batch is None and shape != lh:
        raise ValueError(f"{name} must be [L, H] = {lh}, got {shape}")
    if batch is not None and shape not in (lh, (batch, *lh)):
        raise ValueError(f"{name} must be [L, H] = {lh} or [B, L, H] = {(batch, *lh)}, got {shape}")


def check_ablate_with(
    ablate_with: str | Tensor | None, n_layers: int, n_heads: int, head_dim: int, seq_len: int
) -> None:
    """The heads' ``mu``: ``None``/``"zero"``, ``"resample"``, or a mean ``[L, H, Dh]`` / ``[L, H, T, Dh]``."""
    if ablate_with is None or isinstance(ablate_with, str):
        if ablate_with not in (None, "zero", "resample"):
            raise ValueError(f"ablate_with must be None, 'zero', 'resample' or a tensor, got {ablate_with!r}")
        return
    lh, shape = (n_layers, n_heads), tuple(ablate_with.shape)
    ok = ablate_with.dim() in (3, 4) and shape[:2] == lh and shape[-1] == head_dim
    if not ok or (ablate_with.dim() == 4 and shape[2] < seq_len):
        raise ValueError(
            f"ablate_with must be [L, H, Dh] = {(*lh, head_dim)} or [L, H, T, Dh] with T >= {seq_len}, got {shape}"
        )


def gating_hooks(
    n_layers: int,
    head_gates: Tensor | None = None,
    ablate_with: str | Tensor | None = None,
    mlp_gates: Tensor | None = None,
    mlp_ablate_with: Tensor | None = None,
    group: int | None = None,
) -> dict[str, HookFn]:
    """The gating rule as hooks: ``blocks.{l}.attn.hook_z`` (z ``[B, H, T, Dh]``) gated by
    ``head_gates[..., l, :]`` and, with ``mlp_gates``, ``blocks.{l}.hook_mlp_out`` by ``mlp_gates[..., l]``.

    Arguments as in :func:`gate_heads` and :func:`gate_mlp`, with a leading layer axis on the gates'
    ``L`` dimension and on the means.
    """
    hooks: dict[str, HookFn] = {}
    for layer in range(n_layers):
        if head_gates is not None:
            mu = ablate_with[layer] if isinstance(ablate_with, Tensor) else ablate_with
            hooks[f"blocks.{layer}.attn.hook_z"] = partial(
                _gate_z, gate=head_gates[..., layer, :], ablate_with=mu, group=group
            )
        if mlp_gates is not None:
            mu = None if mlp_ablate_with is None else mlp_ablate_with[layer]
            hooks[f"blocks.{layer}.hook_mlp_out"] = partial(gate_mlp, gate=mlp_gates[..., layer], ablate_with=mu)
    return hooks


def _gate_z(z: Tensor, gate: Tensor, ablate_with: str | Tensor | None, group: int | None) -> Tensor:
    if isinstance(ablate_with, Tensor) and ablate_with.device != z.device:
        ablate_with = ablate_with.to(z.device)
    return gate_heads(z, gate, ablate_with, group)


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
