"""What the callbacks need from a model, whoever built it.

An :class:`Adapter` runs a LightningModule's model on a batch with a
:class:`~lightning_icl.capture.CaptureSpec` and optional head gates, scores the
outputs at the answer positions, names the model's hook points (the hook-point names of
:mod:`lightning_icl.hooks`, on whatever modules hold those activations), and registers
hooks into the training step (a capture to keep, gates whose gradient gives head
attributions) whose handles it holds until they are set to ``None``. The package's own
:class:`~lightning_icl.ICLModule` has :class:`ICLModuleAdapter`; Hugging Face
decoders and any model with a per-head output projection have
:class:`~lightning_icl.adapters.hooks.HookAdapter` and its subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_icl.capture import Capture, CaptureSpec
from lightning_icl.hooks import HookFn, HookHandles, Hooks, add_hooks, hooks_for_call
from lightning_icl.interventions.gating import check_ablate_with, gating_hooks


@dataclass
class Scored:
    """Per-example scores at the ``P`` answer positions of each sequence.

    ``loss`` ``[B, P]`` (cross-entropy or squared error), ``correct`` ``[B, P]`` (token
    tasks; ``None`` otherwise), ``shot`` ``[B, P]`` the example index of each position.
    """

    loss: Tensor
    correct: Tensor | None
    shot: Tensor


class Adapter(ABC):
    """The model-side contract of the callbacks.

    Attributes:
        n_layers, n_heads, head_dim: the model's attention layout.
        native_stats: attention statistics come from the fused attention pass; when
            False, callbacks that need them say so and skip them.
    """

    n_layers: int
    n_heads: int
    head_dim: int
    native_stats: bool = False

    def __init__(self, module: L.LightningModule) -> None:
        self.module = module

    @abstractmethod
    def forward(
        self,
        batch,
        capture: CaptureSpec | None = None,
        head_gates: Tensor | None = None,
        ablate_with: str | Tensor | None = None,
    ) -> tuple[Tensor, Capture | None]:
        """Run the model on ``batch``; ``head_gates`` ``[L, H]`` or ``[B, L, H]``."""

    @abstractmethod
    def score(self, outputs: Tensor, batch) -> Scored:
        """Loss (and correctness) at the answer positions."""

    @abstractmethod
    def answer_positions(self, batch) -> Tensor:
        """``[B, P]`` positions whose next token is an answer (the token before each answer)."""

    @abstractmethod
    def concept(self, batch) -> Tensor:
        """``[B]`` concept label of each sequence."""

    @abstractmethod
    def batch_size(self, batch) -> int: ...

    @abstractmethod
    def repeat(self, batch, times: int):
        """The batch repeated ``times`` times along the batch axis (for batched ablation)."""

    def score_variants(
        self, batch, head_gates: Tensor, ablate_with: str | Tensor | None = None
    ) -> tuple[Scored, Scored]:
        """Scores of the clean batch and of ``N`` gated variants of it (``head_gates`` ``[N, L, H]``).

        The variants' ``loss``, ``correct`` and ``shot`` are ``[N, B, P]``. This default runs the
        clean batch, then the batch replicated ``N`` times with per-example gates (the gating hooks
        on ``hook_z``; ``"resample"`` within each copy) in one forward; adapters that can share
        the work the variants have in common override it (the package's models:
        :func:`~lightning_icl.interventions.shared_ablation_pass`).
        """
        n, b = head_gates.shape[0], self.batch_size(batch)
        check_ablate_with(ablate_with, self.n_layers, self.n_heads, self.head_dim, 0)
        clean = self.score(self.forward(batch)[0], batch)
        copies = self.repeat(batch, n)  # copy i holds rows [i*B, (i+1)*B)
        gates = head_gates.to(clean.loss.device).repeat_interleave(b, dim=0)
        with self.hooks(gating_hooks(self.n_layers, gates, ablate_with, group=b)):
            outputs, _ = self.forward(copies)
        return clean, _split_copies(self.score(outputs, copies), n)

    def missing_stats(self, stats: tuple[str, ...]) -> list[str]:
        """The attention statistics among ``stats`` a capture cannot hold (all of them without ``native_stats``)."""
        return [] if self.native_stats else list(stats)

    # ---- hook points: the one way to reach activations (lightning_icl.hooks) ------------
    @abstractmethod
    def hook_registrars(self) -> dict[str, Callable[[HookFn], RemovableHandle]]:
        """Per hook-point name, a function that registers a hook there and returns its handle."""

    def hook_points(self) -> list[str]:
        """The hook-point names this model has: ``blocks.{l}.attn.hook_z`` (heads' outputs ``[B, H, T, Dh]``),
        ``blocks.{l}.hook_resid_post`` (residual after block l ``[B, T, D]``), and where the model has them
        ``blocks.{l}.hook_mlp_out``, ``blocks.{l}.attn.hook_q`` / ``hook_k``."""
        return list(self.hook_registrars())

    def add_hooks(self, hooks: Hooks) -> HookHandles:
        """Register ``hooks`` (name to function of the activation) until the handles are removed."""
        return add_hooks(hooks, self.hook_registrars())

    def hooks(self, hooks: Hooks):
        """``with adapter.hooks({name: fn}):``: ``hooks`` for the body only (removed also when it raises)."""
        return hooks_for_call(hooks, self.hook_registrars() if hooks else {})

    # ---- hooks into the training step -------------------------------------------------
    @abstractmethod
    def set_training_capture(self, spec: CaptureSpec | None) -> None:
        """Register hooks that keep ``spec`` in the training forwards from now on (``None`` removes them)."""

    @abstractmethod
    def training_capture(self) -> Capture | None:
        """What the last training forward kept."""

    @abstractmethod
    def set_training_gates(self, gates: Tensor | None) -> None:
        """Register gates ``[L, H]`` (ones, requiring grad) on the training forwards (``None`` removes them)."""


def _split_copies(scored: Scored, n: int) -> Scored:
    """``[N * B, P]`` scores of a replicated batch as ``[N, B, P]``."""
    split = lambda x: None if x is None else x.unflatten(0, (n, -1))
    return Scored(loss=split(scored.loss), correct=split(scored.correct), shot=split(scored.shot))
