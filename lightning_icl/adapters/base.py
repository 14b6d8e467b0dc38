"""What the callbacks need from a model, whoever built it.

An :class:`Adapter` runs a LightningModule's model on a batch with a
:class:`~lightning_icl.capture.CaptureSpec` and optional head gates, scores the
outputs at the answer positions, and exposes hooks into the training step (a
capture to keep, gates whose gradient gives head attributions). The package's own
:class:`~lightning_icl.ICLModule` has :class:`ICLModuleAdapter`; Hugging Face
decoders and any model with a per-head output projection have
:class:`~lightning_icl.adapters.hooks.HookAdapter` and its subclasses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import lightning as L
from torch import Tensor, nn

from lightning_icl.capture import Capture, CaptureSpec


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
        clean batch, then the batch replicated ``N`` times with per-example gates in one forward;
        adapters that can share the work the variants have in common override it.
        """
        n, b = head_gates.shape[0], self.batch_size(batch)
        clean = self.score(self.forward(batch)[0], batch)
        copies = self.repeat(batch, n)  # copy i holds rows [i*B, (i+1)*B)
        outputs, _ = self.forward(copies, head_gates=head_gates.repeat_interleave(b, dim=0), ablate_with=ablate_with)
        return clean, _split_copies(self.score(outputs, copies), n)

    def missing_stats(self, stats: tuple[str, ...]) -> list[str]:
        """The attention statistics among ``stats`` a capture cannot hold (all of them without ``native_stats``)."""
        return [] if self.native_stats else list(stats)

    # ---- modules, for interventions made with forward hooks ------------------------------
    def residual_module(self, layer: int) -> nn.Module:
        """The module whose output (a tensor, or a tuple starting with one) is the residual stream after ``layer``."""
        raise NotImplementedError(f"{type(self).__name__} does not name its blocks")

    def head_output_module(self, layer: int) -> nn.Module:
        """The module whose first input is layer ``layer``'s head outputs z, ``[B, T, H * Dh]``."""
        raise NotImplementedError(f"{type(self).__name__} does not name its attention output projections")

    # ---- hooks into the training step -------------------------------------------------
    @abstractmethod
    def set_training_capture(self, spec: CaptureSpec | None) -> None:
        """Ask the next training forwards to keep ``spec`` (``None`` stops)."""

    @abstractmethod
    def training_capture(self) -> Capture | None:
        """What the last training forward kept."""

    @abstractmethod
    def set_training_gates(self, gates: Tensor | None) -> None:
        """Gates ``[L, H]`` (ones, requiring grad) applied in the training forwards."""


def _split_copies(scored: Scored, n: int) -> Scored:
    """``[N * B, P]`` scores of a replicated batch as ``[N, B, P]``."""
    split = lambda x: None if x is None else x.unflatten(0, (n, -1))
    return Scored(loss=split(scored.loss), correct=split(scored.correct), shot=split(scored.shot))
