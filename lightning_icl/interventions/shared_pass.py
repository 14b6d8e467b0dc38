"""The shared ablation pass: the clean run and many gated variants of one batch, computing shared work once.

Ablating every head one at a time by a forward per head repeats, for each head, every layer
below it; this pass runs the clean batch once and lets each variant join at its first gated
layer (see :func:`shared_ablation_pass`). :func:`~lightning_icl.interventions.ablation_effects`
and :func:`~lightning_icl.interventions.head_attribution` reach it through
:meth:`Adapter.score_variants <lightning_icl.adapters.Adapter.score_variants>` on the package's models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_icl.capture import gather_positions

from .gating import ablation_value, check_ablate_with, gate_heads, is_zero

if TYPE_CHECKING:
    from lightning_icl.models import ICLTransformer


def shared_ablation_pass(
    model: ICLTransformer,
    inputs: Tensor,
    head_gates: Tensor,
    ablate_with: str | Tensor | None = None,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The clean run and ``N`` gated variants of one batch, in one pass that computes shared work once.

    Variant ``n`` runs the batch with gates ``head_gates[n]`` ``[L, H]``. Until its first layer
    with a gate other than 1 it is the clean run, so it joins the pass there: it starts from
    the clean residual stream and the clean heads' outputs of that layer, and only the layers
    above are computed for it. Ablating every head one at a time costs the clean forward
    plus, per head, the layers above it; a forward per head costs L full layers per head.

    Args:
        inputs: ``[B, T]`` tokens or ``[B, T, input_dim]`` vectors.
        head_gates: ``[N, L, H]``.
        ablate_with: as in :meth:`ICLTransformer.forward` (``"resample"`` takes the previous example of the
            same variant).
        positions: ``[B, P]`` the positions whose outputs are needed: the final layer's
            projection, MLP and read-out run at these positions only. ``None``: all.

    Returns:
        ``(clean, variants)``: ``[B, T', ...]`` and ``[N, B, T', ...]`` outputs, with
        ``T' = P`` when ``positions`` is given, else ``T``. The variants are differentiable in
        ``head_gates`` (gradients of a gate that stays exactly 1 in every layer are not formed).
    """
    b, t = inputs.shape[:2]
    model.check_length(t)
    if head_gates.dim() != 3 or tuple(head_gates.shape[1:]) != (model.n_layers, model.n_heads):
        raise ValueError(
            f"head_gates must be [N, L, H] with [L, H] = {(model.n_layers, model.n_heads)}, "
            f"got {tuple(head_gates.shape)}"
        )
    check_ablate_with(ablate_with, model.n_layers, model.n_heads, model.head_dim, t)
    if positions is not None and (positions.dim() != 2 or positions.shape[0] != b):
        raise ValueError(f"positions must be [B, P] with B = {b}, got {tuple(positions.shape)}")
    n, b_h = head_gates.shape[0], model.n_heads
    plan = head_gates.detach().cpu()  # which variant joins where: decided on the host, no device syncs
    touched = (plan != 1).any(dim=2)  # [N, L]
    first = torch.where(touched.any(dim=1), touched.float().argmax(dim=1), torch.full_like(touched[:, 0], -1))
    first = first.tolist()  # -1: never gated, identical to the clean run
    touched = touched.tolist()
    h = model.embed_inputs(inputs)
    head_gates = head_gates.to(h.device, non_blocking=True)
    members: list[int] = []  # variants in the running batch, after the clean rows
    for i, block in enumerate(model.blocks):
        z, _ = block.attn.heads(block.ln1(h), (), None, 0, None)  # [(1 + M) * B, H, T, Dh]
        mu = ablate_with[i] if isinstance(ablate_with, Tensor) else ablate_with
        regated = [k for k, v in enumerate(members) if touched[v][i]]
        if regated:  # variants already running that gate this layer again
            rows = z.unflatten(0, (-1, b))
            picked = rows[[k + 1 for k in regated]].flatten(0, 1)
            gates = head_gates[[members[k] for k in regated], i].repeat_interleave(b, dim=0)
            rows = rows.index_copy(0, torch.tensor(regated, device=z.device) + 1,
                                   gate_heads(picked, gates, mu, group=b).unflatten(0, (-1, b)))  # fmt: skip
            z = rows.flatten(0, 1)
        joining = [v for v in range(n) if first[v] == i]
        delta = None
        if joining:  # they branch off the clean rows: z - (g - 1)(z - mu) per gated head, linearly
            zc = z[:b]
            diff = zc if is_zero(mu) else zc - ablation_value(zc, mu)  # [B, H, T, Dh]
        last = i == model.n_layers - 1
        if last and positions is not None:  # nothing after the last attention mixes positions
            rows = positions.repeat(1 + len(members), 1)  # [R, P]
            z, h = gather_positions(z, rows, dim=2), gather_positions(h, rows, dim=1)
            if joining:
                diff = gather_positions(diff, positions, dim=2)
        a = block.attn.project(z)  # [(1 + M) * B, T', D]
        if joining:
            w = block.attn.proj.weight.view(-1, b_h, model.head_dim)  # [D, H, Dh]
            per_head = torch.einsum("bhtk,dhk->hbtd", diff, w)  # each head's contribution, less mu's
            # from the device gates, not the host plan, so the pass is differentiable in them
            dg = (head_gates[joining, i] - 1).to(per_head.dtype)
            delta = torch.einsum("jh,hbtd->jbtd", dg, per_head).flatten(0, 1)
            h = torch.cat([h + a, (h[:b] + a[:b]).repeat(len(joining), 1, 1) + delta])
            members += joining
        else:
            h = h + a
        h = h + block.mlp(block.ln2(h))
    out = model.read_outputs(h)
    clean = out[:b]
    if members == list(range(n)):  # every variant gated something, in order
        return clean, out[b:].unflatten(0, (n, b))
    variants = clean.unsqueeze(0).repeat(n, *([1] * clean.dim()))
    if members:
        variants[members] = out[b:].unflatten(0, (len(members), b))
    return clean, variants
