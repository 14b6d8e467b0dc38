"""What to keep from a forward pass (``CaptureSpec``) and what comes back (``Capture``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from lightning_icl.checks import check_flag, index_list, is_integer
from lightning_icl.hooks import HookFn
from lightning_icl.kernels import SUPPORTED_STATS
from lightning_icl.kernels.torch_attention import select_rows

POSITION_MODES = ("all", "last")


@dataclass
class CaptureSpec:
    """What a forward pass should keep. Nothing that is not asked for is stored.

    Args:
        layers: block indices to capture (negative counts from the end), or one index; ``None`` = all.
        residual: keep the residual stream after each chosen block, ``[B, P, D]``.
        heads: keep per-head outputs z (input of the output projection, before any
            gating), ``[B, H, P, Dh]``.
        stats: attention statistics to keep (one name or several), among ``lse``, ``entropy``, ``max_prob``,
            ``class_mass``, ``same_label_mass``; ``[B, H, P]`` (``class_mass`` ``[B, H, P, C]``).
        positions: ``"all"``, ``"last"``, or indices ``[P]`` or ``[B, P]``: an integer tensor, an integer
            or a (nested) list of integers, kept as a long tensor.
        qk: keep queries and keys (after rotary) at every position, ``[B, H, T, Dh]``, so that
            single attention probabilities can be recovered with ``attention_probability``.
    """

    layers: Sequence[int] | None = None
    residual: bool = False
    heads: bool = False
    stats: Sequence[str] = ()
    positions: str | Tensor = "last"
    qk: bool = False

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(index_list("CaptureSpec layers", self.layers))
        for name in ("residual", "heads", "qk"):
            check_flag(f"CaptureSpec {name}", getattr(self, name))
        self.stats = (self.stats,) if isinstance(self.stats, str) else tuple(self.stats)
        unknown = [s for s in self.stats if s not in SUPPORTED_STATS]
        if unknown:
            raise ValueError(f"CaptureSpec stats {unknown} unknown; choose from {SUPPORTED_STATS}")
        self.positions = _as_positions(self.positions)

    def resolve_layers(self, n_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(n_layers))
        out = []
        for layer in self.layers:
            if not -n_layers <= layer < n_layers:
                raise ValueError(f"CaptureSpec layers: {layer} out of range for a model with {n_layers} layers")
            out.append(layer % n_layers)
        return sorted(set(out))

    def resolve_positions(self, batch: int, seq_len: int, device: torch.device) -> Tensor:
        """``[B, P]`` position indices."""
        if isinstance(self.positions, str):
            idx = (
                torch.arange(seq_len, device=device)
                if self.positions == "all"
                else torch.tensor([seq_len - 1], device=device)
            )
        else:
            idx = self.positions.to(device=device, dtype=torch.long)
        if idx.numel() and not torch.compiler.is_compiling():
            low, high = torch.stack(list(torch.aminmax(idx))).tolist()  # one host sync, not two
            if low < 0 or high >= seq_len:
                raise ValueError(f"CaptureSpec positions must lie in [0, {seq_len}), got [{low}, {high}]")
        if idx.dim() == 1:
            idx = idx.expand(batch, -1)
        if idx.shape[0] != batch:
            raise ValueError(f"CaptureSpec positions has {idx.shape[0]} rows for a batch of {batch}")
        return idx


def _as_positions(positions: object) -> str | Tensor:
    """A position mode, or the indices as a long tensor ``[P]`` / ``[B, P]`` (from a tensor, an integer or
    a (nested) list of integers)."""
    if isinstance(positions, str):
        if positions not in POSITION_MODES:
            raise ValueError(f"CaptureSpec positions must be one of {POSITION_MODES} or indices, got {positions!r}")
        return positions
    if not isinstance(positions, Tensor):
        if not (is_integer(positions) or isinstance(positions, (list, tuple))):
            raise ValueError(
                f"CaptureSpec positions must be one of {POSITION_MODES} or indices (an integer tensor [P] or "
                f"[B, P], or a list of integers), got {positions!r}"
            )
        try:
            converted = torch.tensor([positions] if is_integer(positions) else positions)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"CaptureSpec positions must be a list of integers or of rows of them, got {positions!r}"
            ) from err
        if converted.dtype == torch.bool or (converted.numel() and converted.is_floating_point()):
            raise ValueError(f"CaptureSpec positions must be integers, got {positions!r}")
        positions = converted.long()
    if (
        positions.dim() not in (1, 2)
        or positions.is_floating_point()
        or positions.is_complex()
        or (positions.dtype == torch.bool)
    ):
        raise ValueError(
            "CaptureSpec positions tensor must be integer [P] or [B, P] (indices, not a mask), "
            f"got {positions.dtype} {tuple(positions.shape)}"
        )
    return positions


@dataclass
class Capture:
    """Tensors kept by a forward pass, detached, on the model's device.

    ``residual[l]`` ``[B, P, D]`` is the output of block ``l``; ``heads[l]``
    ``[B, H, P, Dh]`` the per-head z of block ``l``; ``stats[l][name]``
    ``[B, H, P]`` (``class_mass`` ``[B, H, P, C]``). ``positions`` ``[B, P]`` says
    which sequence positions the P axis holds. ``q[l]``, ``k[l]`` ``[B, H, T, Dh]`` cover
    every position (when ``CaptureSpec.qk``); ``scale[l]`` is layer ``l``'s score scale where the
    model sets its own (Hugging Face models; otherwise ``1/sqrt(Dh)``).
    """

    positions: Tensor
    residual: dict[int, Tensor] = field(default_factory=dict)
    heads: dict[int, Tensor] = field(default_factory=dict)
    stats: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    q: dict[int, Tensor] = field(default_factory=dict)
    k: dict[int, Tensor] = field(default_factory=dict)
    scale: dict[int, float] = field(default_factory=dict)


def gather_positions(x: Tensor, positions: Tensor, dim: int) -> Tensor:
    """Select ``positions`` ``[B, P]`` along the sequence axis ``dim`` of ``x`` ``[B, ..., T, ...]``."""
    return select_rows(x, positions, dim)


def capture_hooks(
    spec: CaptureSpec, layers: Sequence[int], target: Callable[[], Capture], qk: bool = True
) -> dict[str, list[HookFn]]:
    """Hooks that keep what ``spec`` asks for at ``layers`` in the capture ``target()`` returns.

    Residual streams are read at ``blocks.{l}.hook_resid_post``, head outputs at ``blocks.{l}.attn.hook_z``
    (``[B, H, T, Dh]``; these hooks go before any gating hook on the same point), queries and keys at
    ``blocks.{l}.attn.hook_q`` / ``hook_k`` (``qk=False``: left to the attention pass, as on Hugging Face
    models). Statistics are not activations: the attention pass returns them.
    """
    hooks: dict[str, list[HookFn]] = {}
    for layer in layers:
        if spec.residual:
            hooks[f"blocks.{layer}.hook_resid_post"] = [partial(_keep, target, "residual", layer, 1)]
        if spec.heads:
            hooks[f"blocks.{layer}.attn.hook_z"] = [partial(_keep, target, "heads", layer, 2)]
        if spec.qk and qk:
            hooks[f"blocks.{layer}.attn.hook_q"] = [partial(_keep, target, "q", layer, None)]
            hooks[f"blocks.{layer}.attn.hook_k"] = [partial(_keep, target, "k", layer, None)]
    return hooks


def _keep(target: Callable[[], Capture], kind: str, layer: int, dim: int | None, x: Tensor) -> None:
    """Store ``x`` (at the capture's positions along ``dim``; every position for ``None``)."""
    capture = target()
    x = x.detach()
    getattr(capture, kind)[layer] = x if dim is None else gather_positions(x, capture.positions, dim=dim)
