"""Pure-torch attention with per-head statistics: the ``"torch"`` backend of ``capture_attention``, its CPU path.

The output (and its backward) is PyTorch's SDPA. The statistics cost one extra no-grad
pass over the *requested* query rows only: their fp32 scores ``[B, H, P, Tk]`` are formed
once, shifted in place by the row's log-sum-exp, exponentiated once, and every statistic
is a reduction of that one block (a row max, a dot with the scores, a small matmul with the
one-hot key classes, a dot with the same-label mask). The log-sum-exp is SDPA's own where
torch returns it (its fused CPU kernel does), so the normaliser costs nothing. Rows are
processed in chunks only when ``P * Tk`` is large, so memory stays bounded for long
sequences; the full ``[T, T]`` pattern is never held.

A key padding mask ``[B, Tk]`` becomes one ``-inf`` bias ``[B, 1, 1, Tk]``, built once: SDPA's
fused CPU kernel takes it together with ``is_causal`` (and gives a query row with no allowed
key a zero output, a zero log-sum-exp and zero gradients), and the statistics add it to their
score block. Rows with no allowed key get every statistic 0, set explicitly.

This is production code, tested like the Triton kernels (:mod:`.triton_attention`) against the
float64 definition in :mod:`.naive`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

CHUNK_ELEMENTS = 1 << 22
"""Most score elements (``B * H * rows * Tk``) the statistics pass holds at once: 16 MiB in fp32."""


def select_rows(x: Tensor, positions: Tensor, dim: int) -> Tensor:
    """``x`` ``[B, ..., T, ...]`` at sequence indices ``positions`` ``[B, P]`` along ``dim``.

    When every sequence asks for the same indices (``positions`` expanded from ``[P]``, or one
    sequence) this is one ``index_select``, a contiguous copy; otherwise a ``gather``.
    """
    if positions.shape[0] == 1 or positions.stride(0) == 0:  # (a [1, P] index applies to every sequence)
        return x.index_select(dim, positions[0])
    shape = [positions.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = positions.shape[1]
    sizes = [s if i != dim else positions.shape[1] for i, s in enumerate(x.shape)]
    return torch.gather(x, dim, positions.view(shape).expand(*sizes))


def capture_attention_torch(
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
    positions: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Attention ``softmax(q k^T * sm_scale) v`` and the requested statistics.

    Shapes: q ``[B, H, Tq, Dh]``, k/v ``[B, H, Tk, Dh]``; ``key_class`` ``[B, Tk]``
    ints in ``[0, num_classes)``; ``query_label`` ``[B, T]`` labels of the positions
    (self-attention, so queries and keys share them); ``positions`` ``[B, P]`` the query
    rows whose statistics are wanted (or ``[P]``, the same rows everywhere; ``None``: every
    row); ``key_padding_mask`` ``[B, Tk]`` bool, True where the key may be attended (``None``:
    every key). A query row with no allowed key gets a zero output row, zero gradients and every
    statistic 0 (``lse`` included). Inputs are assumed valid: :func:`capture_attention` checks them.

    ``out`` has q's dtype and is differentiable; the statistics' scores are computed
    in fp32 (fp64 for fp64 inputs) and returned as fp32 ``[B, H, P]`` (``class_mass``
    ``[B, H, P, C]``), detached.
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
        if not wanted and key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale), {}
        if key_padding_mask is None:
            out, lse = _sdpa_with_lse(q, k, v, causal, scale)
        else:
            out, lse = _sdpa_with_lse(q, k, v, causal, scale, key_padding_mask)
        if not wanted:
            return out, {}
        with torch.no_grad():
            found = _row_stats(
                q.detach(), k.detach(), lse, causal, scale, wanted, key_class, num_classes, query_label, positions,
                key_padding_mask, acc_dtype, chunk_elements,
            )  # fmt: skip
    return out, found


def live_rows(key_padding_mask: Tensor, t_q: int, causal: bool) -> Tensor:
    """``[B, Tq]`` bool: the query rows that may attend at least one key under ``key_padding_mask``."""
    if not causal:
        return key_padding_mask.any(dim=1, keepdim=True).expand(-1, t_q)
    # causal: row i is live iff some allowed key j <= i, i.e. the first allowed key is at most i
    first = torch.where(key_padding_mask.any(dim=1), key_padding_mask.int().argmax(dim=1), t_q)
    return torch.arange(t_q, device=key_padding_mask.device)[None, :] >= first[:, None]


def _cpu_flash_op():
    """SDPA's fused CPU op, which returns its log-sum-exp too (None on a torch without it)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _sdpa_with_lse(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, key_padding_mask: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """SDPA's output and, where torch hands it out (its fused CPU kernel), its log-sum-exp ``[B, H, Tq]``.

    The fused CPU op is what ``F.scaled_dot_product_attention`` itself runs on CPU for these
    inputs, with the same autograd; anywhere else (or on a torch without it) the plain call runs
    and ``None`` comes back, so the statistics pass computes its own normaliser. A key padding
    mask goes to the fused op as a ``-inf`` bias ``[B, 1, 1, Tk]`` next to ``is_causal``; the
    plain call needs the whole ``[B, 1, Tq, Tk]`` mask instead, with rows that allow no key
    opened to every key (so SDPA gives no NaN) and their output then zeroed.
    """
    if q.device.type == "cpu":
        op = _cpu_flash_op()
        if op is not None:
            bias = None
            if key_padding_mask is not None:
                bias = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
                bias = bias.masked_fill_(~key_padding_mask, float("-inf"))[:, None, None, :]
            try:
                out, lse = op(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)[:2]
                return out, lse.detach()
            except (RuntimeError, TypeError, NotImplementedError):
                pass
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale), None
    t_q, t_k = q.shape[2], k.shape[2]
    allowed = key_padding_mask[:, None, None, :]  # [B, 1, 1, Tk]
    if causal:
        allowed = allowed & torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril()
    live = live_rows(key_padding_mask, t_q, causal)[:, None, :, None]  # [B, 1, Tq, 1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~live, scale=scale)
    return out * live.to(out.dtype), None


def _row_stats(
    q: Tensor,
    k: Tensor,
    lse_all: Tensor | None,
    causal: bool,
    scale: float,
    wanted: set[str],
    key_class: Tensor | None,
    num_classes: int,
    query_label: Tensor | None,
    positions: Tensor | None,
    key_padding_mask: Tensor | None,
    acc_dtype: torch.dtype,
    chunk_elements: int,
) -> dict[str, Tensor]:
    """Every statistic of the requested rows from one score block per chunk of rows.

    Scores are kept in base 2 (``log2(e)`` is folded into the query rows with the scale):
    ``exp2`` is several times faster than ``exp`` on CPU, more so on the masked ``-inf``s.
    """
    b, h, t_q, d = q.shape
    t_k = k.shape[2]
    if positions is None:
        rows = torch.arange(t_q, device=q.device).expand(b, t_q)
        q_rows = q
    else:
        rows = positions.long().expand(b, -1) if positions.dim() == 1 else positions.long()
        q_rows = select_rows(q, rows, dim=2)
    shared = rows.shape[0] == 1 or rows.stride(0) == 0  # the same rows in every sequence
    p_total = rows.shape[1]
    # scale and log2(e) are folded into the (few) query rows, not into the (many) scores
    q_rows = (q_rows.to(acc_dtype) * (scale * LOG2E)).expand(b, h, p_total, d)
    k_t = k.to(acc_dtype).transpose(-1, -2)  # [B, H, Dh, Tk]
    one_hot = None
    if "class_mass" in wanted:
        one_hot = F.one_hot(key_class.long(), num_classes).to(acc_dtype)[:, None]  # [B, 1, Tk, C]
    lse2_all = None if lse_all is None else lse_all.to(acc_dtype) * LOG2E
    masked = causal or key_padding_mask is not None  # some scores are -inf
    key_bias = live_all = None
    if key_padding_mask is not None:  # one -inf bias for the padded keys, added to every score block
        key_bias = torch.zeros(b, 1, 1, t_k, dtype=acc_dtype, device=q.device)
        key_bias.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
        live_all = live_rows(key_padding_mask, t_q, causal)
    keys = torch.arange(t_k, device=q.device)
    parts: dict[str, list[Tensor]] = {name: [] for name in wanted}
    step = max(1, chunk_elements // max(1, b * h * t_k))
    for start in range(0, p_total, step):
        r = rows[:, start : start + step]  # [B, c]
        c = r.shape[1]
        qc = q_rows[:, :, start : start + step]
        if causal and shared:  # the mask as a -inf bias, added by the score matmul itself
            bias = torch.zeros(c, t_k, dtype=acc_dtype, device=q.device)
            bias.masked_fill_(keys[None, :] > r[0][:, None], float("-inf"))
            s = torch.baddbmm(bias, qc.reshape(b * h, c, d), k_t.reshape(b * h, d, t_k)).view(b, h, c, t_k)
        else:
            s = torch.matmul(qc, k_t)  # [B, H, c, Tk]: the one score block
            if causal:  # -inf (not a large finite score, whose exp2 is several times slower)
                s.masked_fill_((keys[None, None, :] > r[:, :, None])[:, None], float("-inf"))
        live = None
        if key_bias is not None:
            s.add_(key_bias)
            live = select_rows(live_all, r, dim=1)[:, None]  # [B, 1, c]: rows with an allowed key
        if lse2_all is not None:  # SDPA's normaliser, gathered at these rows
            lse2 = select_rows(lse2_all, r, dim=2)
            if live is not None:  # a row with no allowed key: lse 0, so its p = exp2(-inf) = 0 below
                lse2 = torch.where(live, lse2, 0.0)
            if "max_prob" in wanted:
                parts["max_prob"].append(torch.exp2(s.amax(dim=-1) - lse2))
            s.sub_(lse2[..., None])  # s is now log2 p
            p = torch.exp2(s)
        else:
            m = s.amax(dim=-1)
            if live is not None:  # a row with no allowed key: max 0 and norm 1, so p = 0 and lse 0
                m.masked_fill_(~live, 0.0)
            s.sub_(m[..., None])  # s - max: the row max has weight exp2(0) = 1 before normalising
            p = torch.exp2(s)
            norm = p.sum(dim=-1)
            if live is not None:
                norm.masked_fill_(~live, 1.0)
            lse2 = m + torch.log2(norm)
            if "max_prob" in wanted:
                parts["max_prob"].append(1.0 / norm if live is None else torch.where(live, 1.0 / norm, 0.0))
            p.div_(norm[..., None])
            s.sub_(torch.log2(norm)[..., None])  # log2 p
        if "lse" in wanted:
            parts["lse"].append(lse2 * LN2)
        if "entropy" in wanted:  # -sum p ln p; masked keys have p = 0 and log2 p = -inf: count them as 0
            log2p = s.nan_to_num_(neginf=0.0) if masked else s
            parts["entropy"].append(torch.linalg.vecdot(p, log2p) * -LN2)
        if "class_mass" in wanted:
            parts["class_mass"].append(torch.matmul(p, one_hot))
        if "same_label_mass" in wanted:
            q_lab = select_rows(query_label, r, dim=1)  # [B, c]
            same = (q_lab[:, :, None] == query_label[:, None, :]).to(acc_dtype)[:, None]  # [B, 1, c, Tk]
            parts["same_label_mass"].append(torch.linalg.vecdot(p, same))
    return {
        name: (chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)).float() for name, chunks in parts.items()
    }
