"""Attention and its per-head statistics by definition: what the kernels are tested against.

:func:`naive_attention` materialises the whole ``[B, H, Tq, Tk]`` pattern,
``p = softmax(q k^T * sm_scale)`` with the causal and key padding masks, at ``dtype``
(float64 by default) and computes every statistic from that explicit probability matrix
(:func:`pattern_statistics`). It is slow and takes O(T^2) memory: a definition for tests and
benchmarks, not something to train with. The two production backends, the torch one
(:mod:`.torch_attention`) and the Triton kernels (:mod:`.triton_attention`), share none of
its code, so a test that compares them with it checks them against the maths.

A query row that allows no key (a left-pad row under causal masking, or a sequence masked
whole) gets a zero output row and every statistic 0, as :func:`.capture_attention` promises.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_softmax(
    s: Tensor, *, causal: bool = True, key_padding_mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(s, p, live)`` from raw scores ``s`` ``[B, H, Tq, Tk]``.

    ``s`` comes back with masked keys at ``-inf`` (key ``j`` after query ``i`` when ``causal``,
    and where ``key_padding_mask`` ``[B, Tk]`` is False); ``p`` is its softmax over the keys.
    ``live`` ``[B, 1, Tq]`` flags the rows that allow at least one key (``None`` without a
    padding mask: then every row does); a row that allows none has ``s`` 0 and ``p`` 0.
    """
    t_q, t_k = s.shape[-2], s.shape[-1]
    if key_padding_mask is None:
        if causal:
            s = s.masked_fill(torch.ones(t_q, t_k, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return s, torch.softmax(s, dim=-1), None
    allowed = key_padding_mask.to(device=s.device, dtype=torch.bool)[:, None, None, :]  # [B, 1, 1, Tk]
    if causal:
        allowed = allowed & torch.ones(t_q, t_k, dtype=torch.bool, device=s.device).tril()
    allowed = allowed.expand(s.shape[0], 1, t_q, t_k)
    live = allowed.any(-1)  # [B, 1, Tq]
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~live[..., None], 0.0)
    return s, torch.softmax(s, dim=-1) * live[..., None], live


def pattern_statistics(
    s: Tensor,
    p: Tensor,
    *,
    live: Tensor | None = None,
    key_class: Tensor | None = None,
    num_classes: int = 0,
    query_label: Tensor | None = None,
) -> dict[str, Tensor]:
    """Every statistic of :data:`.SUPPORTED_STATS` by definition, from masked scores and probabilities.

    ``s``, ``p`` and ``live`` as :func:`masked_softmax` returns them. Per query row:
    ``lse = log sum_j exp(s_j)``, ``max_prob = max_j p_j``, ``entropy = -sum_j p_j ln p_j`` (with
    ``0 ln 0 = 0``), ``class_mass[c] = sum_j p_j [key_class_j == c]`` (with ``key_class``
    ``[B, Tk]`` and ``num_classes``) and ``same_label_mass = sum_j p_j [label_j == label_i]`` (with
    ``query_label`` ``[B, T]``, self-attention); a row with no allowed key gets 0 everywhere.
    Returned at ``s``'s dtype; ``class_mass`` and ``same_label_mass`` only when their inputs are given.
    """
    lse = torch.logsumexp(s, -1)
    logp = s - lse[..., None]  # ln p_j; -inf at masked keys, where p_j = 0 counts as 0 below
    stats = {
        "lse": lse if live is None else lse * live.to(s.dtype),
        "max_prob": p.amax(-1),
        "entropy": -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1),
    }
    if key_class is not None and num_classes > 0:
        one_hot = F.one_hot(key_class.long(), num_classes).to(p.dtype)  # [B, Tk, C]
        stats["class_mass"] = torch.einsum("bhqk,bkc->bhqc", p, one_hot)
    if query_label is not None:
        same = query_label[:, :, None] == query_label[:, None, :]  # [B, Tq, Tk]
        stats["same_label_mass"] = (p * same[:, None]).sum(-1)
    return stats


def naive_pattern(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The attention pattern ``softmax(q k^T * sm_scale)`` ``[B, H, Tq, Tk]`` at ``dtype``, masked."""
    return masked_softmax(_scores(q, k, sm_scale, dtype), causal=causal, key_padding_mask=key_padding_mask)[1]


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    key_class: Tensor | None = None,
    num_classes: int = 0,
    query_label: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Attention ``softmax(q k^T * sm_scale) v`` and every statistic, by definition, at ``dtype``.

    The definition the kernels and the torch backend are tested against. q ``[B, H, Tq, Dh]``,
    k/v ``[B, H, Tk, Dh]`` are cast to ``dtype`` (float64 unless a test measures the error that a
    plain computation makes at a lower precision); the arguments mean what they mean for
    :func:`.capture_attention` (``sm_scale`` ``None``: ``1/sqrt(Dh)``). Returns ``(out, stats)``:
    ``out`` ``[B, H, Tq, Dh]`` at ``dtype``, differentiable in q, k and v; ``stats`` as
    :func:`pattern_statistics` gives them, at ``dtype`` and detached. Slow, with O(T^2) memory.
    """
    s, p, live = masked_softmax(_scores(q, k, sm_scale, dtype), causal=causal, key_padding_mask=key_padding_mask)
    out = p @ v.to(dtype)
    with torch.no_grad():
        stats = pattern_statistics(
            s, p, live=live, key_class=key_class, num_classes=num_classes, query_label=query_label
        )
    return out, stats


def _scores(q: Tensor, k: Tensor, sm_scale: float | None, dtype: torch.dtype) -> Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    return (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale


__all__ = ["masked_softmax", "naive_attention", "naive_pattern", "pattern_statistics"]
