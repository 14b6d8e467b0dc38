"""The fused kernel as ``torch.library`` custom ops, with fake implementations and autograd.

Registered ops (opaque to ``torch.compile``, so a model using them compiles without
graph breaks):

- ``lightning_icl::capture_attention_fwd(q, k, v, key_class, label, rows, key_mask, causal,
  sm_scale, num_classes, entropy, max_prob, class_mass, same_label, ieee)``
  -> ``(out, lse2, entropy, max_prob, class_mass, same_label_mass)``; ``rows`` (``[B, T]`` int8
  or None) flags the query rows whose statistics are wanted: the statistics are computed in
  the query tiles holding a flagged row and are undefined elsewhere. ``key_mask`` (``[B, T]``
  bool or None) flags the keys that may be attended; a row that allows none gets a zero
  output, zero statistics and ``lse2`` 0.
- ``lightning_icl::capture_attention_bwd(grad_out, q, k, v, out, lse2, key_mask, causal,
  sm_scale, ieee)`` -> ``(dq, dk, dv)``

Triton is imported on first use, so ``TRITON_INTERPRET`` may be set any time before.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _kernels():
    from . import triton_attention

    return triton_attention


@torch.library.custom_op("lightning_icl::capture_attention_fwd", mutates_args=())
def capture_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_class: Tensor | None,
    label: Tensor | None,
    rows: Tensor | None,
    key_mask: Tensor | None,
    causal: bool,
    sm_scale: float,
    num_classes: int,
    entropy: bool,
    max_prob: bool,
    class_mass: bool,
    same_label: bool,
    ieee: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels().forward(
        q, k, v, key_class, label, rows, causal, sm_scale, num_classes, entropy, max_prob, class_mass, same_label, ieee,
        key_mask,
    )  # fmt: skip


@capture_attention_fwd.register_fake
def _(q, k, v, key_class, label, rows, key_mask, causal, sm_scale, num_classes, entropy, max_prob, class_mass,
      same_label, ieee):  # fmt: skip
    b, h, t, d = q.shape
    stat = q.new_empty((b, h, t), dtype=torch.float32)
    none = q.new_empty((0,), dtype=torch.float32)
    return (
        q.new_empty((b, h, t, d)),
        stat.clone(),
        stat.clone() if entropy else none.clone(),
        stat.clone() if max_prob else none.clone(),
        q.new_empty((b, h, t, num_classes), dtype=torch.float32) if class_mass else none.clone(),
        stat.clone() if same_label else none.clone(),
    )


@torch.library.custom_op("lightning_icl::capture_attention_bwd", mutates_args=())
def capture_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse2: Tensor,
    key_mask: Tensor | None,
    causal: bool,
    sm_scale: float,
    ieee: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().backward(grad_out, q, k, v, out, lse2, causal, sm_scale, ieee, key_mask)


@capture_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse2, key_mask, causal, sm_scale, ieee):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, _, _, _, key_mask, causal, sm_scale, _, _, _, _, _, ieee = inputs
    out, lse2 = output[0], output[1]
    ctx.save_for_backward(q, k, v, out, lse2, key_mask)
    ctx.causal, ctx.sm_scale, ctx.ieee = causal, sm_scale, ieee


def _backward(ctx, grad_out, *unused_stat_grads):
    q, k, v, out, lse2, key_mask = ctx.saved_tensors
    dq, dk, dv = capture_attention_bwd(grad_out, q, k, v, out, lse2, key_mask, ctx.causal, ctx.sm_scale, ctx.ieee)
    return dq, dk, dv, *([None] * 12)


torch.library.register_autograd("lightning_icl::capture_attention_fwd", _backward, setup_context=_setup_context)
