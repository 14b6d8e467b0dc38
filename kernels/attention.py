"""``capture_attention``: the one attention entry point of the package."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch
from torch import Tensor

from .torch_attention import capture_attention_torch, select_rows

SUPPORTED_HEAD_DIMS: tuple[int, ...] = (16, 32, 64, 128)
"""Head dimensions the fused kernel is built for; the torch backend accepts any."""

SUPPORTED_STATS: tuple[str, ...] = ("lse", "entropy", "max_prob", "class_mass", "same_label_mass")
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_MAX_CLASSES = 64
"""Most key classes the kernel's class-mass accumulator holds (its registers grow with it)."""


def _can_inspect(x: Tensor) -> bool:
    """Value checks read the data, which a compiled graph cannot do without breaking."""
    return x.numel() > 0 and not torch.compiler.is_compiling()


def _is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _is_integer(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_index_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_scale(sm_scale: float | None) -> None:
    if sm_scale is not None and not (_is_number(sm_scale) and math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a finite number > 0 or None (1/sqrt(Dh)), got {sm_scale!r}")


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    sm_scale: float | None,
    stats: tuple[str, ...],
    key_class: Tensor | None,
    num_classes: int,
    query_label: Tensor | None,
    positions: Tensor | None,
    key_padding_mask: Tensor | None,
    backend: str,
    fp32_precision: str,
    validate: bool,
) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if fp32_precision not in ("tf32", "ieee"):
        raise ValueError(f"fp32_precision must be 'tf32' or 'ieee', got {fp32_precision!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if not isinstance(validate, bool):
        raise ValueError(f"validate must be True or False, got {validate!r}")
    _check_scale(sm_scale)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor [B, H, T, Dh], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, Dh], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if q.shape[3] < 1:
        raise ValueError(f"q must have a head dim Dh >= 1, got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    unknown = [s for s in stats if s not in SUPPORTED_STATS]
    if unknown:
        raise ValueError(f"stats {unknown} unknown; choose from {SUPPORTED_STATS}")
    if not _is_integer(num_classes) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    b, t_k = k.shape[0], k.shape[2]
    if "class_mass" in stats:
        if key_class is None or num_classes < 1:
            raise ValueError("stats 'class_mass' needs key_class [B, T] and num_classes >= 1")
        if not _is_index_dtype(key_class.dtype):
            raise ValueError(f"key_class must be an integer tensor of class ids, got {key_class.dtype}")
        if key_class.device != k.device:
            raise ValueError(f"key_class is on {key_class.device}, k on {k.device}")
        if key_class.shape != (b, t_k):
            raise ValueError(f"key_class must be [B, Tk] = {(b, t_k)}, got {tuple(key_class.shape)}")
    if "same_label_mass" in stats:
        if q.shape[2] != t_k:
            raise ValueError("stats 'same_label_mass' needs self-attention (Tq == Tk)")
        if query_label is None or query_label.shape != (b, t_k):
            got = None if query_label is None else tuple(query_label.shape)
            raise ValueError(f"stats 'same_label_mass' needs query_label [B, T] = {(b, t_k)}, got {got}")
        if query_label.device != q.device:
            raise ValueError(f"query_label is on {query_label.device}, q on {q.device}")
    if positions is not None:
        if not _is_index_dtype(positions.dtype):
            raise ValueError(f"positions must be an integer index tensor, got {positions.dtype}")
        if positions.dim() not in (1, 2) or (positions.dim() == 2 and positions.shape[0] != b):
            raise ValueError(f"positions must be [P] or [B, P] with B = {b}, got shape {tuple(positions.shape)}")
        if positions.device != q.device:
            raise ValueError(f"positions is on {positions.device}, q on {q.device}")
    if key_padding_mask is not None:  # shape, dtype and device only: its values need no check (nor a sync)
        if not isinstance(key_padding_mask, Tensor):
            raise ValueError(f"key_padding_mask must be a bool tensor [B, Tk], got {type(key_padding_mask).__name__}")
        if not (key_padding_mask.dtype == torch.bool or _is_index_dtype(key_padding_mask.dtype)):
            raise ValueError(
                f"key_padding_mask must be bool (or integer 0/1), True where the key may be attended, "
                f"got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (b, t_k):
            raise ValueError(f"key_padding_mask must be [B, Tk] = {(b, t_k)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != k.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, k on {k.device}")
    if validate:
        _check_values(q, k, v, key_class if "class_mass" in stats else None, num_classes, positions)


def _check_values(
    q: Tensor, k: Tensor, v: Tensor, key_class: Tensor | None, num_classes: int, positions: Tensor | None
) -> None:
    """The checks that read the data: q, k, v finite (a NaN query gives no usable output row
    and NaN statistics), ``key_class`` and ``positions`` in range. Every minimum and
    maximum is stacked into one tensor, so they cost one host synchronisation in all."""
    named = [(name, x) for name, x in (("q", q), ("k", k), ("v", v), ("key_class", key_class),
             ("positions", positions)) if x is not None and _can_inspect(x)]  # fmt: skip
    if not named:
        return
    with torch.no_grad():
        ranges = torch.stack([torch.stack(list(torch.aminmax(x))).double() for _, x in named]).tolist()
    for (name, _), (low, high) in zip(named, ranges, strict=True):
        if name in ("q", "k", "v") and not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(
                f"{name} must be finite, got values from {low} to {high} (NaN or inf); validate=False skips this check"
            )
        if name == "key_class" and (low < 0 or high >= num_classes):
            raise ValueError(f"key_class values must lie in [0, {num_classes}), got [{int(low)}, {int(high)}]")
        if name == "positions" and (low < 0 or high >= q.shape[2]):
            raise ValueError(
                f"positions must lie in [0, {q.shape[2]}) (the query length), got [{int(low)}, {int(high)}]"
            )


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
    key_padding_mask: Tensor | None = None,
    backend: str = "auto",
    fp32_precision: str = "tf32",
    validate: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scaled dot-product attention that also returns per-head statistics.

    Args:
        q, k, v: ``[B, H, T, Dh]`` (any strides).
        causal: mask keys after the query.
        sm_scale: score scale, a finite number > 0 (``1/sqrt(Dh)`` by default).
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
        key_padding_mask: ``[B, Tk]`` bool (integer 0/1 is converted), True where the key may be
            attended, e.g. a tokenizer's attention mask; ``None`` (default): every key. It combines
            with ``causal``: query i attends key j iff both allow it. The statistics are over the
            allowed keys only (``class_mass`` sums to 1 over the classes), so a left- or
            right-padded sequence gives at its valid rows exactly what it gives unpadded, output
            and gradients included; padded keys get zero gradients. A query row with no allowed
            key (a left-pad row under causal masking, or a sequence masked whole) gives a zero
            output row, zero gradients and every statistic 0: ``lse``, ``entropy``, ``max_prob``,
            ``same_label_mass`` and each ``class_mass`` entry (never NaN).
        backend: ``"auto"`` (the fused Triton kernel on CUDA tensors when Triton is
            installed and the head dim is supported, else the torch backend),
            ``"torch"`` (:func:`.capture_attention_torch`: SDPA and one statistics pass) or
            ``"triton"`` (the kernel; on CPU tensors it needs ``TRITON_INTERPRET=1`` set before
            the first launch).
        fp32_precision: ``"tf32"`` (default) or ``"ieee"`` for the kernel's fp32 dots on GPU.
        validate: check the *values*: q, k and v finite (no NaN or inf), ``key_class`` and
            ``positions`` in range. That reads them back from the device: one host synchronisation
            in all on a GPU, and one reduction over q, k and v. A caller that checked its inputs
            once per batch (``ICLTransformer`` does, for ``key_class`` and ``positions``) passes
            ``False`` so the attention of every layer does not wait for the host. Shapes, dtypes
            and the other arguments are always checked (``key_padding_mask``: its shape and dtype
            only, never its values, so it adds no synchronisation).

    Returns:
        ``(out, stats)``: ``out`` like ``q``, differentiable; ``stats`` fp32, detached.
    """
    stats = (stats,) if isinstance(stats, str) else tuple(stats)
    _check_inputs(
        q, k, v, causal, sm_scale, stats, key_class, num_classes, query_label, positions, key_padding_mask, backend,
        fp32_precision, validate,
    )  # fmt: skip
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if positions is not None and positions.dim() == 1:
        positions = positions.expand(q.shape[0], -1)
    if positions is not None:
        positions = positions.long()
    if _use_triton(q, k, backend, num_classes if "class_mass" in stats else 0):
        return _triton_attention(
            q, k, v, causal, scale, stats, key_class, num_classes, query_label, positions, key_padding_mask,
            fp32_precision,
        )  # fmt: skip
    return capture_attention_torch(
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
        key_padding_mask=key_padding_mask,
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
    key_padding_mask: Tensor | None,
    fp32_precision: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    from . import custom_ops

    rows = None
    heavy = {"entropy", "class_mass", "same_label_mass"} & set(stats)  # lse and max_prob cost nothing extra
    if positions is not None and heavy:  # which query rows the statistics are wanted for, as a [B, T] flag
        rows = torch.zeros(q.shape[0], q.shape[2], dtype=torch.int8, device=q.device)
        rows.scatter_(1, positions, 1)
    out, lse2, ent, maxp, cls, same = custom_ops.capture_attention_fwd(
        q, k, v,
        key_class if "class_mass" in stats else None,
        query_label if "same_label_mass" in stats else None,
        rows, key_padding_mask,
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
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating-point tensor [B, H, T, Dh], got {got}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must be [B, H, Tq] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    if not _is_index_dtype(key_index.dtype):
        raise ValueError(f"key_index must be an integer tensor of key positions, got {key_index.dtype}")
    if key_index.shape not in ((q.shape[2],), (q.shape[0], q.shape[2])):
        raise ValueError(f"key_index must be [T] or [B, T] = {(q.shape[0], q.shape[2])}, got {tuple(key_index.shape)}")
    _check_scale(sm_scale)
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
