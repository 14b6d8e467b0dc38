"""Ablating heads, during or after training: every head removed in turn, in batched passes.

This works through an :class:`~lightning_icl.adapters.Adapter`, so on any model the
package can gate. Heads are ablated on ``z`` (the output-projection input):
``y_h = g_h z_h + (1 - g_h) mu_h`` with ``mu`` zero, the head's mean output, or
another example's output (resample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_icl.capture import CaptureSpec
from lightning_icl.checks import check_number, check_optional_positive

from .gating import check_ablation_mode

if TYPE_CHECKING:  # the adapters import the gating rule from this package
    from lightning_icl.adapters import Adapter


@dataclass
class AblationResult:
    """Effects of removing each head, ``[L, H]``: ablated minus clean, averaged over answers."""

    loss_effect: Tensor
    acc_effect: Tensor | None
    clean_loss: Tensor
    clean_acc: Tensor | None
    count: int  # answers averaged over


def head_means(adapter: Adapter, batch) -> Tensor:
    """``[L, H, Dh]`` mean of every head's output over the batch and all positions."""
    _, cap = adapter.forward(batch, capture=CaptureSpec(heads=True, positions="all"))
    return torch.stack([cap.heads[layer].mean(dim=(0, 2)) for layer in range(adapter.n_layers)])


def ablate_with(adapter: Adapter, batch, mode: str) -> str | Tensor | None:
    """The ``ablate_with`` of an ablation ``mode``: ``None`` (zero), ``"resample"``, or the heads'
    means on ``batch`` (mean)."""
    check_ablation_mode(mode)
    return head_means(adapter, batch) if mode == "mean" else {"zero": None, "resample": "resample"}[mode]


@torch.no_grad()
def ablation_effects(
    adapter: Adapter, batch, mode: str = "zero", heads_per_forward: int | None = None, gate: float = 0.0
) -> AblationResult:
    """Ablate every head, up to ``heads_per_forward`` (default: all) per pass.

    Each ablation is a variant of the batch with its own gates, run through
    :meth:`Adapter.score_variants`: on the package's models one pass computes the clean run
    and, per head, only the layers from the head's own up (the last layer at the answer
    positions only); on other models the batch is replicated once per head. ``gate`` is the
    value the ablated head's gate takes (0: full ablation; e.g. 0.95 for a small, partial one).
    """
    check_ablation_mode(mode)
    check_optional_positive("heads_per_forward", heads_per_forward)
    check_number("gate", gate, 0.0, 1.0)
    n_l, n_h = adapter.n_layers, adapter.n_heads
    heads = [(layer, head) for layer in range(n_l) for head in range(n_h)]
    per = len(heads) if heads_per_forward is None else heads_per_forward
    mu = ablate_with(adapter, batch, mode)
    losses, accs, clean = [], [], None
    for start in range(0, len(heads), per):
        chunk = torch.tensor(heads[start : start + per])  # [n, 2] (layer, head)
        gates = torch.ones(len(chunk), n_l, n_h)  # built on the host: the pass reads its structure there
        gates[torch.arange(len(chunk)), chunk[:, 0], chunk[:, 1]] = gate
        clean, scored = adapter.score_variants(batch, gates, ablate_with=mu)
        losses.append(scored.loss.flatten(1).double().mean(1))
        if scored.correct is not None:
            accs.append(scored.correct.flatten(1).double().mean(1))
    clean_loss = clean.loss.double().mean()
    clean_acc = None if clean.correct is None else clean.correct.double().mean()
    return AblationResult(
        loss_effect=torch.cat(losses).view(n_l, n_h) - clean_loss,
        acc_effect=None if clean_acc is None else torch.cat(accs).view(n_l, n_h) - clean_acc,
        clean_loss=clean_loss,
        clean_acc=clean_acc,
        count=clean.loss.numel(),
    )
