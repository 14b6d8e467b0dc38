"""Head interventions usable during or after training: batched ablation and gate attribution.

Both work through an :class:`~lightning_icl.adapters.Adapter`, so on any model the
package can gate. Heads are ablated on ``z`` (the output-projection input):
``y_h = g_h z_h + (1 - g_h) mu_h`` with ``mu`` zero, the head's mean output, or
another example's output (resample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_icl.adapters import Adapter
from lightning_icl.capture import CaptureSpec

ABLATIONS = ("zero", "mean", "resample")


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


@torch.no_grad()
def ablation_effects(
    adapter: Adapter, batch, mode: str = "zero", heads_per_forward: int | None = None, gate: float = 0.0
) -> AblationResult:
    """Ablate every head, several per forward: the batch is replicated once per head and each
    copy gets its own per-example gates, so L*H ablations cost ``ceil(L*H / heads_per_forward)``
    forwards instead of L*H. ``gate`` is the value the ablated head's gate takes (0: full
    ablation; e.g. 0.95 for a small, partial one).
    """
    if mode not in ABLATIONS:
        raise ValueError(f"mode must be one of {ABLATIONS}, got {mode!r}")
    n_l, n_h = adapter.n_layers, adapter.n_heads
    heads = [(layer, head) for layer in range(n_l) for head in range(n_h)]
    per = len(heads) if heads_per_forward is None else heads_per_forward
    if per < 1:
        raise ValueError(f"heads_per_forward must be >= 1, got {per}")
    b = adapter.batch_size(batch)
    clean = adapter.score(adapter.forward(batch)[0], batch)
    mu = {"zero": None, "resample": "resample", "mean": head_means(adapter, batch) if mode == "mean" else None}[mode]
    loss = torch.zeros(n_l, n_h, dtype=torch.float64, device=clean.loss.device)
    acc = torch.zeros_like(loss) if clean.correct is not None else None
    for start in range(0, len(heads), per):
        chunk = heads[start : start + per]
        gates = torch.ones(len(chunk), n_l, n_h, device=clean.loss.device)
        for i, (layer, head) in enumerate(chunk):
            gates[i, layer, head] = gate
        big = adapter.repeat(batch, len(chunk))  # copy i holds rows [i*B, (i+1)*B)
        outputs, _ = adapter.forward(big, head_gates=gates.repeat_interleave(b, dim=0), ablate_with=mu)
        scored = adapter.score(outputs, big)
        chunk_loss = scored.loss.view(len(chunk), -1).double().mean(1)
        chunk_acc = None if scored.correct is None else scored.correct.view(len(chunk), -1).double().mean(1)
        for i, (layer, head) in enumerate(chunk):
            loss[layer, head] = chunk_loss[i]
            if acc is not None:
                acc[layer, head] = chunk_acc[i]
    clean_loss = clean.loss.double().mean()
    clean_acc = None if clean.correct is None else clean.correct.double().mean()
    return AblationResult(
        loss_effect=loss - clean_loss,
        acc_effect=None if acc is None else acc - clean_acc,
        clean_loss=clean_loss,
        clean_acc=clean_acc,
        count=clean.loss.numel(),
    )


def gate_gradients(adapter: Adapter, batch, ablate_with: str | Tensor | None = None) -> Tensor:
    """``[L, H]`` gradient of the mean answer loss with respect to head gates at 1.

    ``-gradient`` is the first-order estimate of each head's ablation effect on the loss, for
    the ablation ``ablate_with`` names (zero by default; a ``head_means`` tensor for mean ablation).
    """
    gates = torch.ones(adapter.n_layers, adapter.n_heads, requires_grad=True, device=_device(adapter))
    with torch.enable_grad():
        outputs, _ = adapter.forward(batch, head_gates=gates, ablate_with=ablate_with)
        loss = adapter.score(outputs, batch).loss.mean()
        (grad,) = torch.autograd.grad(loss, gates)  # leaves the parameters' .grad alone
    return grad


def _device(adapter: Adapter) -> torch.device:
    return next(adapter.module.parameters()).device
