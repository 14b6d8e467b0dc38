"""Adapter for the package's own :class:`~lightning_icl.ICLModule`."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from lightning_icl.capture import Capture, CaptureSpec
from lightning_icl.tasks.batch import ICLBatch

from .base import Adapter, Scored


class ICLBatchScoring:
    """How an adapter scores, tiles and reads :class:`ICLBatch` batches for an ICL module
    (``module.per_position_loss``): shared by the adapters of the package's modules."""

    def score(self, outputs: Tensor, batch: ICLBatch) -> Scored:
        loss, correct = self.module.per_position_loss(outputs, batch)
        b = len(batch)
        return Scored(
            loss=loss.view(b, -1),
            correct=None if correct is None else correct.view(b, -1),
            shot=batch.shot[batch.mask].view(b, -1),
        )

    def answer_positions(self, batch: ICLBatch) -> Tensor:
        return batch.scored_positions()

    def concept(self, batch: ICLBatch) -> Tensor:
        return batch.concept

    def batch_size(self, batch: ICLBatch) -> int:
        return len(batch)

    def repeat(self, batch: ICLBatch, times: int) -> ICLBatch:
        tile = lambda x: x.repeat(times, *([1] * (x.dim() - 1)))
        return replace(
            batch,
            inputs=tile(batch.inputs),
            targets=tile(batch.targets),
            mask=tile(batch.mask),
            concept=tile(batch.concept),
            shot=tile(batch.shot),
            token_class=tile(batch.token_class),
            family=None if batch.family is None else tile(batch.family),
        )


class ICLModuleAdapter(ICLBatchScoring, Adapter):
    """Runs an ``ICLModule`` on ``ICLBatch`` batches; attention statistics are native."""

    native_stats = True

    def __init__(self, module) -> None:
        super().__init__(module)
        model = module.model
        self.n_layers, self.n_heads, self.head_dim = model.n_layers, model.n_heads, model.head_dim

    def forward(
        self, batch: ICLBatch, capture=None, head_gates=None, ablate_with=None
    ) -> tuple[Tensor, Capture | None]:
        return self.module(batch, capture=capture, head_gates=head_gates, ablate_with=ablate_with)

    def score_variants(self, batch: ICLBatch, head_gates: Tensor, ablate_with=None) -> tuple[Scored, Scored]:
        """One pass through :meth:`ICLTransformer.forward_variants`: each variant computes only the
        layers from its first gated one up, and the last layer only at the answer positions."""
        positions = batch.scored_positions()
        clean, variants = self.module.model.forward_variants(batch.inputs, head_gates, ablate_with, positions)
        targets, shot = torch.gather(batch.targets, 1, positions), torch.gather(batch.shot, 1, positions)
        loss, correct = self.module.answer_loss(clean, targets)
        v_loss, v_correct = self.module.answer_loss(variants, targets.expand(variants.shape[0], *targets.shape))
        return Scored(loss, correct, shot), Scored(v_loss, v_correct, shot.expand_as(v_loss))

    def residual_module(self, layer: int):
        return self.module.model.blocks[layer]

    def head_output_module(self, layer: int):
        return self.module.model.blocks[layer].attn.proj

    def set_training_capture(self, spec: CaptureSpec | None) -> None:
        self.module.train_capture_spec = spec
        if spec is None:
            self.module.last_capture = None

    def training_capture(self) -> Capture | None:
        return self.module.last_capture

    def set_training_gates(self, gates: Tensor | None) -> None:
        self.module.train_head_gates = gates
