"""Adapter for the package's own :class:`~lightning_icl.ICLModule`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_icl.capture import Capture, CaptureSpec
from lightning_icl.hooks import HookFn
from lightning_icl.interventions.gating import check_head_gates
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
    """Runs an ``ICLModule`` on ``ICLBatch`` batches; attention statistics are native, hook points are
    the model's own (:meth:`ICLTransformer.hook_points <lightning_icl.models.ICLTransformer.hook_points>`).

    A training-step capture or gate is a keyword argument given to the module's training forwards
    (``module(batch)`` in train mode, not giving that argument itself) by a forward pre-hook on the
    module, registered until set to ``None``; the capture of the last such call is kept by a forward hook.
    """

    native_stats = True

    def __init__(self, module) -> None:
        super().__init__(module)
        model = module.model
        self.n_layers, self.n_heads, self.head_dim = model.n_layers, model.n_heads, model.head_dim
        self._capture_arg: _TrainingArgument | None = None
        self._gates_arg: _TrainingArgument | None = None

    def forward(
        self, batch: ICLBatch, capture=None, head_gates=None, ablate_with=None
    ) -> tuple[Tensor, Capture | None]:
        return self.module(batch, capture=capture, head_gates=head_gates, ablate_with=ablate_with)

    def hook_registrars(self) -> dict[str, Callable[[HookFn], RemovableHandle]]:
        return self.module.model.hook_registrars()

    def score_variants(self, batch: ICLBatch, head_gates: Tensor, ablate_with=None) -> tuple[Scored, Scored]:
        """One :func:`~lightning_icl.interventions.shared_ablation_pass`: each variant computes only the
        layers from its first gated one up, and the last layer only at the answer positions."""
        from lightning_icl.interventions.shared_pass import shared_ablation_pass

        positions = batch.scored_positions()
        clean, variants = shared_ablation_pass(self.module.model, batch.inputs, head_gates, ablate_with, positions)
        targets, shot = torch.gather(batch.targets, 1, positions), torch.gather(batch.shot, 1, positions)
        loss, correct = self.module.answer_loss(clean, targets)
        v_loss, v_correct = self.module.answer_loss(variants, targets.expand(variants.shape[0], *targets.shape))
        return Scored(loss, correct, shot), Scored(v_loss, v_correct, shot.expand_as(v_loss))

    def set_training_capture(self, spec: CaptureSpec | None) -> None:
        if self._capture_arg is not None:
            self._capture_arg.remove()
        self._capture_arg = None if spec is None else _TrainingArgument(self.module, "capture", spec, keep=True)

    def training_capture(self) -> Capture | None:
        return None if self._capture_arg is None else self._capture_arg.output

    def set_training_gates(self, gates: Tensor | None) -> None:
        check_head_gates(gates, self.n_layers, self.n_heads, None, name="training head_gates")
        if self._gates_arg is not None:
            self._gates_arg.remove()
        self._gates_arg = None if gates is None else _TrainingArgument(self.module, "head_gates", gates)


class _TrainingArgument:
    """``name=value`` given to every training-mode call of ``module`` that does not give ``name`` itself,
    until :meth:`remove`; with ``keep``, the capture those calls return is kept in ``output``."""

    def __init__(self, module: nn.Module, name: str, value: object, keep: bool = False) -> None:
        self.name, self.value, self.output = name, value, None
        self.handles = [module.register_forward_pre_hook(self._give, with_kwargs=True)]
        if keep:
            self.handles.append(module.register_forward_hook(self._keep, with_kwargs=True))

    def _give(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not module.training or self.name in kwargs:
            return None
        return args, {**kwargs, self.name: self.value}

    def _keep(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        if kwargs.get(self.name) is self.value:
            self.output = output[1]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
