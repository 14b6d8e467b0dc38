"""Pure-torch attention with per-head statistics, chunked over queries.

This is the CPU path and the test oracle of the Triton kernel. Memory is
O(T * chunk) per (batch, head) for the statistics: the full ``[T, T]`` pattern is
never held at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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

    Scores are computed in fp32 (fp64 for fp64 inputs); ``out`` has q's dtype and
    is differentiable; statistics are fp32 and detached.
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
        return _chunked(q, k, v, causal, scale, acc_dtype, wanted, key_class, num_classes, query_label, chunk_size)


def _chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    acc_dtype: torch.dtype,
    wanted: set[str],
    key_class: Tensor | None,
    num_classes: int,
    query_label: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    t_q, t_k = q.shape[2], k.shape[2]
    qa, ka, va = q.to(acc_dtype), k.to(acc_dtype), v.to(acc_dtype)
    one_hot = None
    if "class_mass" in wanted:
        one_hot = torch.nn.functional.one_hot(key_class.long(), num_classes).to(acc_dtype)  # [B, Tk, C]
    outs: list[Tensor] = []
    parts: dict[str, list[Tensor]] = {name: [] for name in wanted}
    for start in range(0, t_q, chunk_size):
        stop = min(start + chunk_size, t_q)
        s = torch.matmul(qa[:, :, start:stop], ka.transpose(-1, -2)) * scale  # [B, H, c, Tk]
        if causal:
            s = s.masked_fill(~_causal_mask(start, stop - start, t_k, q.device), float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # [B, H, c, 1]
        p = torch.exp(s - lse)
        outs.append(torch.matmul(p, va))
        if not wanted:
            continue
        with torch.no_grad():
            s_d, lse_d, p_d = s.detach(), lse.detach(), p.detach()
            if "lse" in wanted:
                parts["lse"].append(lse_d.squeeze(-1))
            if "max_prob" in wanted:
                parts["max_prob"].append(p_d.amax(dim=-1))
            if "entropy" in wanted:
                # masked scores are -inf with p = 0; zero them so 0 * -inf is not NaN
                finite = torch.where(p_d > 0, s_d, torch.zeros_like(s_d))
                parts["entropy"].append(lse_d.squeeze(-1) - (p_d * finite).sum(-1))
            if "class_mass" in wanted:
                parts["class_mass"].append(torch.einsum("bhqk,bkc->bhqc", p_d, one_hot))
            if "same_label_mass" in wanted:
                same = query_label[:, start:stop, None] == query_label[:, None, :]  # [B, c, Tk]
                parts["same_label_mass"].append((p_d * same[:, None].to(p_d.dtype)).sum(-1))
    out = torch.cat(outs, dim=2).to(q.dtype)
    result = {name: torch.cat(chunks, dim=2).float() for name, chunks in parts.items()}
    return out, result
