"""Hugging Face causal LMs on the package's attention: ``attn_implementation="lightning_icl"``.

Importing this module registers the attention implementation ``"lightning_icl"`` (and its mask
function) with ``transformers``, so that::

    import lightning_icl.hf
    model = AutoModelForCausalLM.from_config(config, attn_implementation="lightning_icl")
    # or from_pretrained(path, attn_implementation="lightning_icl"), or model.set_attn_implementation("lightning_icl")

runs every attention layer through :func:`lightning_icl.kernels.capture_attention` (the Triton
kernel on CUDA, the reference path on CPU). The output is the model's own attention, exactly;
inside :func:`record_attention` (or an adapter's capture) the same pass also returns per-head
statistics.

Grouped-query attention: keys and values are expanded to the query heads, so statistics are per
query head. Padding: the mask function hands the attention a key padding mask ``[B, Tk]``
(``True`` = attend), or ``None`` when nothing is padded; causality is implied. A query with no
key to attend (a left-padding position) gets a zero output and zero statistics, where eager
attention spreads it uniformly: only padding positions differ.

A forward whose queries do not cover the whole key sequence (decoding with a KV cache, as
``generate`` does) or that comes with a ready-made 4-D mask runs PyTorch's
``scaled_dot_product_attention`` with the exact mask instead: the same output, no statistics
(asking for statistics in such a forward raises).

What the kernel cannot compute is refused with a ``ValueError`` naming the config field, never
approximated: attention logit soft-capping (``attn_logit_softcapping``), a sliding window shorter
than the sequence (``sliding_window`` / ``use_sliding_window``), attention dropout in training
mode (``attention_dropout`` / ``attn_pdrop``), attention sinks, position biases and any
non-causal pattern (``is_causal=False``, cross-attention, packed sequences). The forward refuses
at its first attention call; :func:`check_config` says so before a model is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from lightning_icl.kernels import SUPPORTED_STATS, capture_attention

IMPLEMENTATION = "lightning_icl"
"""The ``attn_implementation`` name this module registers."""

DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop")
"""Config fields that hold an attention-probability dropout rate."""


# ---- what the kernel cannot do ------------------------------------------------------------
def _window_fields(config: Any) -> str:
    return "sliding_window / use_sliding_window" if hasattr(config, "use_sliding_window") else "sliding_window"


def _refuse_window(config: Any, window: int, seq_len: int) -> None:
    raise ValueError(
        f"config.{_window_fields(config)}: a sliding window of {window} keys is shorter than the sequence "
        f"({seq_len} keys); attn_implementation='{IMPLEMENTATION}' computes full causal attention only (a window "
        "at least as long as the sequence is fine); shorten the sequences, widen or disable the window, or use "
        "another attention implementation"
    )


def _refuse_dropout(config: Any, rate: float) -> None:
    name = next((f for f in DROPOUT_FIELDS if getattr(config, f, None)), DROPOUT_FIELDS[0])
    raise ValueError(
        f"config.{name}={rate}: attention dropout in training mode is not supported by "
        f"attn_implementation='{IMPLEMENTATION}' (its statistics describe the attention pattern itself); "
        f"set {name}=0.0"
    )


def _refuse_softcap(value: float) -> None:
    raise ValueError(
        f"config.attn_logit_softcapping={value}: attention logit soft-capping is not supported by "
        f"attn_implementation='{IMPLEMENTATION}'; set attn_logit_softcapping=None or use another implementation"
    )


def _refuse_non_causal(what: str) -> None:
    raise ValueError(
        f"{what}: attn_implementation='{IMPLEMENTATION}' computes causal self-attention only (the attention of a "
        "decoder); use another attention implementation for this model"
    )


def check_config(config: Any, seq_len: int | None = None, training: bool = False) -> None:
    """Raise ``ValueError`` naming the field of ``config`` that this attention cannot compute.

    ``seq_len``: the longest sequence the model will see (a sliding window at least that long
    is full attention); ``training``: whether attention dropout would be active.
    """
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        _refuse_softcap(softcap)
    if not getattr(config, "is_causal", True):
        _refuse_non_causal("config.is_causal=False")
    if getattr(config, "add_cross_attention", False) or getattr(config, "is_encoder_decoder", False):
        _refuse_non_causal("config.add_cross_attention / is_encoder_decoder")
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window is not None and seq_len is not None and window < seq_len:
        _refuse_window(config, window, seq_len)
    if training:
        for name in DROPOUT_FIELDS:
            rate = getattr(config, name, None)
            if isinstance(rate, (int, float)) and rate > 0:
                _refuse_dropout(config, rate)


def uses_kernel(model: nn.Module) -> bool:
    """Whether ``model`` (a Hugging Face model) runs its attention on ``"lightning_icl"``."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == IMPLEMENTATION


# ---- who wants statistics -----------------------------------------------------------------
@dataclass
class StatRequest:
    """What one attention call should compute besides its output."""

    stats: tuple[str, ...] = ()
    positions: Tensor | None = None  # [B, P]; None = every query row
    key_class: Tensor | None = None
    num_classes: int = 0
    query_label: Tensor | None = None
    qk: bool = False


class Listener(Protocol):
    """Receives the statistics of the attention layers of one model."""

    def request(self, layer: int, batch: int, seq_len: int, device: torch.device) -> StatRequest | None: ...

    def deliver(
        self, layer: int, stats: dict[str, Tensor], q: Tensor | None, k: Tensor | None, scale: float
    ) -> None: ...


_LISTENERS: list[tuple[frozenset[int], Listener]] = []
"""Active listeners and the ids of the modules of the model each listens to (latest last)."""


def listen(model: nn.Module, listener: Listener) -> None:
    """Send the statistics of ``model``'s attention layers to ``listener`` until :func:`unlisten`."""
    _LISTENERS.append((frozenset(id(m) for m in model.modules()), listener))


def unlisten(listener: Listener) -> None:
    for i, (_, other) in enumerate(_LISTENERS):
        if other is listener:
            del _LISTENERS[i]
            return


def _listener_for(module: nn.Module) -> Listener | None:
    for ids, listener in reversed(_LISTENERS):
        if id(module) in ids:
            return listener
    return None


def _layer_of(module: nn.Module) -> int:
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(
            f"{type(module).__name__} has no layer_idx: attention statistics are recorded per layer, and the "
            "layer index comes from the attention module"
        )
    return int(layer)


# ---- the attention function ---------------------------------------------------------------
def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The ``"lightning_icl"`` attention: query ``[B, H, Tq, Dh]``, key/value ``[B, Hkv, Tk, Dh]``.

    Returns ``(out [B, Tq, H, Dh], None)`` (no attention weights: the statistics replace them).
    """
    config = getattr(module, "config", None)
    if softcap is not None:
        _refuse_softcap(softcap)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        _refuse_non_causal(f"{type(module).__name__}.is_causal=False (cross-attention or a bidirectional model)")
    for name in ("s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            _refuse_non_causal(f"{type(module).__name__} passes {name} (attention sinks or a position bias)")
    if dropout:
        _refuse_dropout(config, dropout)
    t_q, t_k = query.shape[2], key.shape[2]
    if sliding_window is not None and sliding_window < t_k:
        _refuse_window(config, sliding_window, t_k)
    if value.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"{type(module).__name__}: value head dim {value.shape[-1]} differs from the query's {query.shape[-1]}; "
            f"attn_implementation='{IMPLEMENTATION}' needs one head dim"
        )
    h, h_kv = query.shape[1], key.shape[1]
    if h % h_kv:
        raise ValueError(f"{type(module).__name__}: {h} query heads do not share {h_kv} key/value heads evenly")
    if h != h_kv:  # grouped-query attention: query head j reads key/value head j // (h / h_kv)
        b, _, _, d = key.shape
        key = key[:, :, None].expand(b, h_kv, h // h_kv, t_k, d).reshape(b, h, t_k, d)
        value = value[:, :, None].expand(b, h_kv, h // h_kv, t_k, d).reshape(b, h, t_k, d)

    listener = _listener_for(module)
    layer = _layer_of(module) if listener is not None else -1
    request = listener.request(layer, query.shape[0], t_q, query.device) if listener is not None else None
    wants = request is not None and (request.stats or request.qk)

    if (attention_mask is not None and attention_mask.dim() != 2) or t_q != t_k:
        if wants:
            raise ValueError(
                f"attention statistics need the whole sequence in one causal pass, but layer {layer} got "
                f"{t_q} queries for {t_k} keys or a ready-made 4-D mask (a KV cache, as in generation); run the "
                "forward without past key values (use_cache=False) and with a 2-D attention_mask"
            )
        return _sdpa(query, key, value, attention_mask, scaling), None

    padding = None if attention_mask is None else attention_mask.to(torch.bool)
    if not wants:
        out, _ = capture_attention(
            query, key, value, causal=True, sm_scale=scaling, key_padding_mask=padding, validate=False
        )
        return out.transpose(1, 2), None
    out, stats = capture_attention(
        query,
        key,
        value,
        causal=True,
        sm_scale=scaling,
        stats=request.stats,
        key_class=request.key_class,
        num_classes=request.num_classes,
        query_label=request.query_label,
        positions=request.positions,
        key_padding_mask=padding,
        validate=False,
    )
    q, k = (query.detach(), key.detach()) if request.qk else (None, None)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    listener.deliver(layer, stats, q, k, scale)
    return out.transpose(1, 2), None


def _sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float | None) -> Tensor:
    """Exact attention for what the kernel does not run: queries that are the last ``Tq`` of ``Tk`` keys."""
    t_q, t_k = query.shape[2], key.shape[2]
    if mask is None or mask.dim() == 2:
        keep = torch.ones(t_q, t_k, dtype=torch.bool, device=query.device).tril(t_k - t_q)  # bottom-right causal
        if mask is not None:
            keep = keep[None, None] & mask.to(torch.bool)[:, None, None, -t_k:]
        mask = keep
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: Tensor | None = None,
    config: Any = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> Tensor | None:
    """The ``"lightning_icl"`` mask: ``None`` (causal, no padding) or a key padding mask ``[B, Tk]``.

    A forward whose queries are not the whole key sequence (a KV cache) gets the exact 4-D boolean
    mask instead, for the SDPA fallback. A pattern that is not causal (a sliding window shorter than
    the sequence, bidirectional attention, packed sequences, custom mask functions) raises.
    """
    whole = q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
    if not whole:
        return sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
            use_vmap=use_vmap, device=device,
        )  # fmt: skip
    if mask_function is not causal_mask_function:
        pattern = sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, mask_function=mask_function,
            attention_mask=None, allow_is_causal_skip=False, use_vmap=use_vmap, device=device,
        )  # fmt: skip
        causal = torch.ones(q_length, kv_length, dtype=torch.bool, device=pattern.device).tril()
        if not bool((pattern == causal).all()):
            window = getattr(config, "sliding_window", None)
            if window is not None and window < kv_length:
                _refuse_window(config, window, kv_length)
            if not getattr(config, "is_causal", True):
                _refuse_non_causal("config.is_causal=False")
            _refuse_non_causal(
                "the model asks for an attention pattern that is not causal (packed sequences in position_ids, "
                "or a custom mask function)"
            )
    if attention_mask is None:
        return None
    padding = attention_mask[:, -kv_length:].to(torch.bool)
    if padding.shape[1] == kv_length and bool(padding.all()):
        return None
    return padding


def register() -> None:
    """Register ``"lightning_icl"`` with transformers (done on import; registering again is harmless)."""
    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, mask_function)


register()


# ---- recording statistics -------------------------------------------------------------------
@dataclass
class AttentionRecord:
    """What :func:`record_attention` keeps: ``stats[layer][name]`` of the latest forward pass,
    and ``passes``, every forward run inside the context (``passes[-1] is stats``)."""

    stats: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    passes: list[dict[int, dict[str, Tensor]]] = field(default_factory=list)


class _Recorder:
    def __init__(self, request: StatRequest, positions: Tensor | None) -> None:
        self.spec, self.positions = request, positions
        self.record = AttentionRecord()

    def request(self, layer: int, batch: int, seq_len: int, device: torch.device) -> StatRequest:
        if not self.record.passes or layer in self.record.stats:  # the first layer, or one seen again: a new forward
            self.record.stats = {}
            self.record.passes.append(self.record.stats)
        positions = self.positions
        if positions is not None:
            if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= seq_len):
                raise ValueError(f"record_attention positions must lie in [0, {seq_len}), got {positions.tolist()}")
            positions = positions.to(device).expand(batch, -1) if positions.dim() == 1 else positions.to(device)
        return StatRequest(
            stats=self.spec.stats,
            positions=positions,
            key_class=self.spec.key_class,
            num_classes=self.spec.num_classes,
            query_label=self.spec.query_label,
        )

    def deliver(self, layer: int, stats: dict[str, Tensor], q: Tensor | None, k: Tensor | None, scale: float) -> None:
        self.record.stats[layer] = {name: x.float() for name, x in stats.items()}


@contextmanager
def record_attention(
    model: nn.Module,
    stats: str | Sequence[str] = ("lse", "entropy", "max_prob"),
    positions: Tensor | Sequence[int] | None = None,
    key_class: Tensor | None = None,
    num_classes: int = 0,
    query_label: Tensor | None = None,
):
    """Record the attention statistics of every forward of ``model`` run inside the context.

    ``record.stats[layer][name]`` is fp32 ``[B, H, T]`` (``[B, H, P]`` with ``positions``, an
    integer tensor or list ``[P]`` or ``[B, P]``; ``class_mass`` ``[B, H, T, C]``), with the names
    and meanings of :func:`~lightning_icl.kernels.capture_attention`: ``lse``, ``entropy``,
    ``max_prob``, and with their inputs ``class_mass`` (``key_class`` ``[B, T]``, ``num_classes``)
    and ``same_label_mass`` (``query_label`` ``[B, T]``, e.g. the input ids). ``layer`` is the
    attention module's ``layer_idx``; heads are query heads. ``record.passes`` holds every forward.

    The model must run on ``attn_implementation="lightning_icl"``; anything else raises.
    """
    if not uses_kernel(model):
        got = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(
            f"record_attention needs a model on attn_implementation='{IMPLEMENTATION}', got {got!r}: build it with "
            f"attn_implementation='{IMPLEMENTATION}' or call model.set_attn_implementation('{IMPLEMENTATION}') "
            "after `import lightning_icl.hf`"
        )
    stats = (stats,) if isinstance(stats, str) else tuple(stats)
    unknown = [s for s in stats if s not in SUPPORTED_STATS]
    if unknown or not stats:
        raise ValueError(f"record_attention stats {unknown or stats} unknown; choose from {SUPPORTED_STATS}")
    if positions is not None and not isinstance(positions, Tensor):
        positions = torch.tensor(positions, dtype=torch.long)
    if positions is not None and (positions.dim() not in (1, 2) or positions.is_floating_point()):
        raise ValueError(f"record_attention positions must be integer [P] or [B, P], got {tuple(positions.shape)}")
    check_config(model.config)
    recorder = _Recorder(
        StatRequest(stats=stats, key_class=key_class, num_classes=num_classes, query_label=query_label),
        None if positions is None else positions.long(),
    )
    listen(model, recorder)
    try:
        yield recorder.record
    finally:
        unlisten(recorder)


__all__ = [
    "IMPLEMENTATION",
    "AttentionRecord",
    "StatRequest",
    "attention_forward",
    "check_config",
    "listen",
    "mask_function",
    "record_attention",
    "register",
    "unlisten",
    "uses_kernel",
]
