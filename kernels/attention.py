"""``capture_attention``: the one attention entry point of the package."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .reference import attention_reference, select_rows

SUPPORTED_HEAD_DIMS: tuple[int, ...] = (16, 32, 64, 128)
"""Head dimensions the fused kernel is built for; the reference accepts any."""

SUPPORTED_STATS: tuple[str, ...] = ("lse", "entropy", "max_prob", "class_mass", "same_label_mass")
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_MAX_CLASSES = 64
"""Most key classes the kernel's class-mass accumulator holds (its registers grow with it)."""


def _can_inspect(x: Tensor) -> bool:
    """Value checks read the data, which a compiled graph cannot do without breaking."""
    return x.numel() > 0 and not torch.compiler.is_compiling()


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    stats: Sequence[str],
    key_class: Tensor | None,
    num_classes: int,
    query_label: Tensor | None,
    positions: Tensor | None,
    backend: str,
    validate: bool,
) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, Dh], got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    unknown = [s for s in stats if s not in SUPPORTED_STATS]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {SUPPORTED_STATS}")
    b, t_k = k.shape[0], k.shape[2]
    if "class_mass" in stats:
        if key_class is None or num_classes < 1:
            raise ValueError("stats 'class_mass' needs key_class [B, T] and num_classes >= 1")
        if key_class.device != k.device:
            raise ValueError(f"key_class is on {key_class.device}, k on {k.device}")
        if key_class.shape != (b, t_k):
            raise ValueError(f"key_class must be [B, Tk] = {(b, t_k)}, got {tuple(key_class.shape)}")
        if validate and _can_inspect(key_class):
            low, high = _value_range(key_class)
            if low < 0 or high >= num_classes:
                raise ValueError(f"key_class values must lie in [0, {num_classes}), got [{low}, {high}]")
    if "same_label_mass" in stats:
        if q.shape[2] != t_k:
            raise ValueError("stats 'same_label_mass' needs self-attention (Tq == Tk)")
        if query_label is None or query_label.shape != (b, t_k):
            got = None if query_label is None else tuple(query_label.shape)
            raise ValueError(f"stats 'same_label_mass' needs query_label [B, T] = {(b, t_k)}, got {got}")
        if query_label.device != q.device:
            raise ValueError(f"query_label is on {query_label.device}, q on {q.device}")
    if positions is not None:
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise ValueError(f"positions must be an integer index tensor, got {positions.dtype}")
        if positions.dim() not in (1, 2) or (positions.dim() == 2 and positions.shape[0] != b):
            raise ValueError(f"positions must be [P] or [B, P] with B = {b}, got shape {tuple(positions.shape)}")
        if positions.device != q.device:
            raise ValueError(f"positions is on {positions.device}, q on {q.device}")
        if validate and _can_inspect(positions):
            low, high = _value_range(positions)
            if low < 0 or high >= q.shape[2]:
                raise ValueError(f"positions must lie in [0, {q.shape[2]}) (the query length), got [{low}, {high}]")


def _value_range(x: Tensor) -> tuple[int, int]:
    """``(min, max)`` of an integer tensor with one host synchronisation."""
    low, high = torch.aminmax(x)
    low, high = torch.stack([low, high]).tolist()
    return int(low), int(high)


def capture_attention(
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
    backend: str = "auto",
    fp32_precision: str = "tf32",
    validate: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scaled dot-product attention that also returns per-head statistics.

    Args:
        q, k, v: ``[B, H, T, Dh]`` (any strides).
        causal: mask keys after the query.
        sm_scale: score scale, ``1/sqrt(Dh)`` by default.
        stats: names among ``lse``, ``entropy``, ``max_prob`` (``[B, H, T]``),
            ``class_mass`` (``[B, H, T, num_classes]``: attention mass on keys of
            each class given by ``key_class`` ``[B, T]``) and ``same_label_mass``
            (``[B, H, T]``: mass on keys whose ``query_label`` equals the query's).
        positions: the query rows whose statistics are wanted, an integer tensor ``[P]``
            (the same rows in every sequence) or ``[B, P]``; the statistics then come back
            ``[B, H, P]`` (``class_mass`` ``[B, H, P, C]``), row ``p`` holding query
            ``positions[..., p]``, exactly the all-rows statistics gathered there. ``None``
            (default): every row. The CPU path forms scores for these rows only; the kernel does
            the statistics' extra work only in query tiles that hold one of them. The output
            ``out`` always covers every row.
        backend: ``"auto"`` (the fused Triton kernel on CUDA tensors when Triton is
            installed and the head dim is supported, else the reference),
            ``"torch"`` (the reference) or ``"triton"`` (the kernel; on CPU tensors it
            needs ``TRITON_INTERPRET=1`` set before the first launch).
        fp32_precision: ``"tf32"`` (default) or ``"ieee"`` for the kernel's fp32 dots on GPU.
        validate: check the *values* of ``key_class`` and ``positions`` (their range), which
            reads them back from the device: one host synchronisation each on a GPU. A caller
            that checked them once per batch (``ICLTransformer`` does) passes ``False`` so the
            attention of every layer does not wait for the host. Shapes are always checked.

    Returns:
        ``(out, stats)``: ``out`` like ``q``, differentiable; ``stats`` fp32, detached.
    """
    stats = tuple(stats)
    _check_inputs(q, k, v, causal, stats, key_class, num_classes, query_label, positions, backend, validate)
    if fp32_precision not in ("tf32", "ieee"):
        raise ValueError(f"fp32_precision must be 'tf32' or 'ieee', got {fp32_precision!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if positions is not None and positions.dim() == 1:
        positions = positions.expand(q.shape[0], -1)
    if positions is not None:
        positions = positions.long()
    if _use_triton(q, k, backend, num_classes if "class_mass" in stats else 0):
        return _triton_attention(
            q, k, v, causal, scale, stats, key_class, num_classes, query_label, positions, fp32_precision
        )
    return attention_reference(
        q,
        k,
        v,
        causal=causal,
        sm_scale=sm_scale,
        stats=stats,
        key_class=key_class,
        num_classes=num_classes,
        query_label=query_label,
        positions=positions,
    )


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
"""Looked up once at import: torch.compile (2.11) refuses to trace ``find_spec`` inside a graph."""


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def _use_triton(q: Tensor, k: Tensor, backend: str, num_classes: int) -> bool:
    if backend == "torch":
        return False
    fits = (
        q.shape[-1] in SUPPORTED_HEAD_DIMS
        and q.dtype in TRITON_DTYPES
        and q.shape[2] == k.shape[2]
        and num_classes <= KERNEL_MAX_CLASSES
    )
    if backend == "auto":
        return q.is_cuda and fits and triton_available()
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
    check_head_dim(q.shape[-1], argument="q.shape[-1]")
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' supports dtypes {TRITON_DTYPES}, got {q.dtype}")
    if q.shape[2] != k.shape[2]:
        raise ValueError("backend='triton' computes self-attention: q and k need the same length")
    if num_classes > KERNEL_MAX_CLASSES:
        raise ValueError(
            f"backend='triton' holds at most {KERNEL_MAX_CLASSES} key classes, got num_classes={num_classes}"
        )
    if not q.is_cuda:
        from . import triton_attention

        if not triton_attention.INTERPRETED:
            raise ValueError(
                "backend='triton' on CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                "in the environment before the first Triton launch (or use backend='torch')"
            )
    return True


def _triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    stats: tuple[str, ...],
    key_class: Tensor | None,
    num_classes: int,
    query_label: Tensor | None,
    positions: Tensor | None,
    fp32_precision: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    from . import ops

    rows = None
    heavy = {"entropy", "class_mass", "same_label_mass"} & set(stats)  # lse and max_prob cost nothing extra
    if positions is not None and heavy:  # which query rows the statistics are wanted for, as a [B, T] flag
        rows = torch.zeros(q.shape[0], q.shape[2], dtype=torch.int8, device=q.device)
        rows.scatter_(1, positions, 1)
    out, lse2, ent, maxp, cls, same = ops.capture_attention_fwd(
        q, k, v,
        key_class if "class_mass" in stats else None,
        query_label if "same_label_mass" in stats else None,
        rows,
        causal, scale, num_classes if "class_mass" in stats else 0,
        "entropy" in stats, "max_prob" in stats, "class_mass" in stats, "same_label_mass" in stats,
        fp32_precision == "ieee",
    )  # fmt: skip
    found = {"entropy": ent, "max_prob": maxp, "class_mass": cls, "same_label_mass": same}
    if "lse" in stats:
        found["lse"] = lse2 * math.log(2.0)  # the kernel keeps base 2 for its backward
    picked = {name: found[name].detach() for name in stats}
    if positions is not None:  # rows outside the requested tiles were never computed: gather the asked ones
        picked = {name: select_rows(x, positions, dim=2) for name, x in picked.items()}
    return out, picked


def check_head_dim(head_dim: int, argument: str = "head_dim") -> None:
    """Raise a ValueError naming ``argument`` if the fused kernel cannot run ``head_dim``."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{argument} gives a head dimension of {head_dim}; the attention kernel supports {SUPPORTED_HEAD_DIMS}"
        )


def attention_probability(
    q: Tensor, k: Tensor, lse: Tensor, key_index: Tensor, *, causal: bool = True, sm_scale: float | None = None
) -> Tensor:
    """Exact attention probability of each query on one chosen key, from the ``lse`` statistic.

    ``p_ij = exp(s_ij - lse_i)`` costs O(T * Dh): no pattern is formed. ``key_index``
    ``[B, T]`` (or ``[T]``) names the key of each query, e.g. ``t - 1`` for a
    previous-token score or the position after the last occurrence of the current
    token for an induction score. Keys outside ``[0, Tk)`` (or after the query when
    ``causal``) get probability 0. Returns fp32 ``[B, H, Tq]``.
    """
    b, h, t_q, d = q.shape
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    idx = key_index.to(q.device).long().expand(b, t_q)
    valid = (idx >= 0) & (idx < k.shape[2])
    if causal:
        valid &= idx <= torch.arange(t_q, device=q.device)
    safe = idx.clamp(0, k.shape[2] - 1)
    keys = torch.gather(k.float(), 2, safe[:, None, :, None].expand(b, h, t_q, d))  # [B, H, Tq, Dh]
    s = (q.float() * keys).sum(-1) * scale
    return torch.where(valid[:, None], torch.exp(s - lse.float()), torch.zeros_like(s)).detach()


__all__ = [
    "BACKENDS",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_STATS",
    "attention_probability",
    "capture_attention",
    "check_head_dim",
]
