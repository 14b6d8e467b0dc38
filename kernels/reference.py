"""Pure-torch attention with per-head statistics, chunked over queries.

This is the CPU path of ``capture_attention``. The output comes from PyTorch's
SDPA (computed in fp32 for half inputs); the statistics from a separate pass over
query chunks, so their memory is O(T * chunk) per (batch, head): the full
``[T, T]`` pattern is never held at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _causal_mask(q_start: int, q_len: int, t_k: int, device: torch.device) -> Tensor:
    """``[q_len, t_k]`` bool, True where key j may be seen by query i (j <= i)."""
    rows = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    cols = torch.arange(t_k, device=device)[None, :]
    return cols <= rows


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    stats: Sequence[str] = (),
    key_class: Tensor | None = None,
    num_classes: int = 0,
    query_label: Tensor | None = None,
    chunk_size: int = 256,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Attention ``softmax(q k^T * sm_scale) v`` and the requested statistics.

    Shapes: q ``[B, H, Tq, Dh]``, k/v ``[B, H, Tk, Dh]``; ``key_class`` ``[B, Tk]``
    ints in ``[0, num_classes)``; ``query_label`` ``[B, T]`` labels of the positions
    (self-attention, so queries and keys share them). Inputs are assumed valid:
    :func:`capture_attention` checks them.

    ``out`` has q's dtype and is differentiable; the statistics' scores are computed
    in fp32 (fp64 for fp64 inputs) and returned as fp32, detached.
    """
    t_q, d = q.shape[2], q.shape[3]
    t_k = k.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    wanted = set(stats)
    if causal and t_q != t_k:
        raise ValueError(f"causal attention needs Tq == Tk, got {t_q} and {t_k}")

    # Under autocast the matmuls below would drop back to half precision; keep them in acc_dtype.
    with torch.autocast(q.device.type, enabled=False):
        # The output (and its backward) is SDPA's, fused and O(T) in memory; the statistics
        # come from a separate no-grad pass over query chunks in acc_dtype.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        if not wanted:
            return out, {}
        with torch.no_grad():
            qa, ka = q.detach().to(acc_dtype), k.detach().to(acc_dtype)
            stats = _chunked_stats(qa, ka, causal, scale, wanted, key_class, num_classes, query_label, chunk_size)
    return out, stats


def _chunked_stats(
    q: Tensor,
    k: Tensor,
    causal: bool,
    scale: float,
    wanted: set[str],
    key_class: Tensor | None,
    num_classes: int,
    query_label: Tensor | None,
    chunk_size: int,
) -> dict[str, Tensor]:
    t_q, t_k = q.shape[2], k.shape[2]
    one_hot = None
    if "class_mass" in wanted:
        one_hot = F.one_hot(key_class.long(), num_classes).to(q.dtype)  # [B, Tk, C]
    parts: dict[str, list[Tensor]] = {name: [] for name in wanted}
    for start in range(0, t_q, chunk_size):
        stop = min(start + chunk_size, t_q)
        s = torch.matmul(q[:, :, start:stop], k.transpose(-1, -2)) * scale  # [B, H, c, Tk]
        if causal:
            s = s.masked_fill(~_causal_mask(start, stop - start, t_k, q.device), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [B, H, c]
        p = torch.exp(s - lse[..., None])
        if "lse" in wanted:
            parts["lse"].append(lse)
        if "max_prob" in wanted:
            parts["max_prob"].append(p.amax(dim=-1))
        if "entropy" in wanted:
            # masked scores are -inf with p = 0; zero them so 0 * -inf is not NaN
            parts["entropy"].append(lse - (p * torch.where(p > 0, s, torch.zeros_like(s))).sum(-1))
        if "class_mass" in wanted:
            parts["class_mass"].append(torch.einsum("bhqk,bkc->bhqc", p, one_hot))
        if "same_label_mass" in wanted:
            same = query_label[:, start:stop, None] == query_label[:, None, :]  # [B, c, Tk]
            parts["same_label_mass"].append((p * same[:, None].to(p.dtype)).sum(-1))
    return {name: torch.cat(chunks, dim=2).float() for name, chunks in parts.items()}
