"""Head importance during training: batched ablation and gate-gradient attribution."""

from __future__ import annotations

from typing import Any

import torch

from lightning_icl.interventions import ABLATIONS, ablation_effects

from .base import ICLCallback, heatmap


def _top_heads(effect: torch.Tensor, k: int) -> list[list]:
    order = effect.flatten().argsort(descending=True)[:k]
    n_h = effect.shape[1]
    return [[int(i // n_h), int(i % n_h), float(effect.flatten()[i])] for i in order]


class HeadAblation(ICLCallback):
    """Effect of ablating every head on held-out answers, ``[L, H]``, in one shared pass.

    Logs ``ablation/clean_loss``, ``ablation/L<l>H<h>`` (loss increase when the head is
    removed) and ``ablation/top1``; the record holds the loss and accuracy effects, and the
    ``top_k`` heads. Under DDP the effects are averaged over every rank's answers. See
    :func:`~lightning_icl.interventions.ablation_effects` for how the pass shares work.

    Args:
        mode: ``"zero"``, ``"mean"`` (the head's mean output on the batch) or ``"resample"``.
        top_k: heads listed in the record.
        heads_per_forward: heads ablated per pass (bounds memory: each adds a copy of the
            batch from its layer up); ``None`` ablates all heads in one pass.
        every_n_steps, on_validation, num_batches, dataloader_idx, tag: see :class:`ICLCallback`.
    """

    name = "ablation"

    def __init__(
        self,
        mode: str = "zero",
        top_k: int = 5,
        heads_per_forward: int | None = None,
        every_n_steps: int | None = None,
        on_validation: bool = True,
        num_batches: int = 1,
        dataloader_idx: int = 0,
        tag: str | None = None,
    ) -> None:
        super().__init__(every_n_steps, on_validation, num_batches, dataloader_idx, tag)
        if mode not in ABLATIONS:
            raise ValueError(f"mode must be one of {ABLATIONS}, got {mode!r}")
        if heads_per_forward is not None and heads_per_forward < 1:
            raise ValueError(f"heads_per_forward must be >= 1 or None, got {heads_per_forward}")
        self.mode, self.top_k, self.heads_per_forward = mode, top_k, heads_per_forward

    def measure(self, trainer, pl_module) -> dict[str, Any]:
        adapter = self.adapter(pl_module)
        sums: torch.Tensor | None = None  # [loss effect, acc effect, clean loss, clean acc] weighted sums + count
        for batch in self.eval_batches(trainer, pl_module):
            r = ablation_effects(adapter, batch, self.mode, self.heads_per_forward)
            acc = r.acc_effect if r.acc_effect is not None else torch.zeros_like(r.loss_effect)
            clean_acc = r.clean_acc if r.clean_acc is not None else torch.zeros_like(r.clean_loss)
            part = torch.cat([r.loss_effect.flatten(), acc.flatten(), r.clean_loss[None], clean_acc[None]]) * r.count
            part = torch.cat([part, torch.tensor([float(r.count)], dtype=part.dtype, device=part.device)])
            sums = part if sums is None else sums + part
            has_acc = r.acc_effect is not None
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        mean = sums[:-1] / sums[-1]
        n = adapter.n_layers * adapter.n_heads
        loss = mean[:n].view(adapter.n_layers, adapter.n_heads)
        record = {
            "mode": self.mode,
            "loss_effect": loss.tolist(),
            "acc_effect": mean[n : 2 * n].view_as(loss).tolist() if has_acc else None,
            "clean_loss": float(mean[2 * n]),
            "clean_acc": float(mean[2 * n + 1]) if has_acc else None,
            "top_heads": _top_heads(loss, self.top_k),
        }
        return record

    def scalars(self, record):
        out = {"clean_loss": record["clean_loss"], "top1": record["top_heads"][0][2]}
        for layer, row in enumerate(record["loss_effect"]):
            out.update({f"L{layer}H{head}": v for head, v in enumerate(row)})
        return out

    def figure(self, record):
        return heatmap(record["loss_effect"], f"{self.mode} ablation at step {record['step']}", "loss increase (nats)")


class HeadAttribution(ICLCallback):
    """First-order ablation effect of every head from the training step's own backward.

    Gates ``g = 1`` (``[L, H]``, requiring grad) multiply each head's output in the
    training forward; after each backward ``-dL/dg`` (the linearised loss change of removing
    the head) is accumulated, and every ``every_n_steps`` (and at validation) the average
    since the last report is recorded. No extra forward. Under DDP the ranks' averages are averaged.
    """

    name = "attribution"

    def __init__(self, every_n_steps: int | None = 50, on_validation: bool = True, top_k: int = 5) -> None:
        super().__init__(every_n_steps, on_validation, num_batches=1, dataloader_idx=0)
        self.top_k = top_k
        self._gates: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        adapter = self.adapter(pl_module)
        if self._gates is None or self._gates.device != pl_module.device:
            self._gates = torch.ones(adapter.n_layers, adapter.n_heads, device=pl_module.device, requires_grad=True)
        adapter.set_training_gates(self._gates)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._gates is not None and self._gates.grad is not None:
            grad = -self._gates.grad.detach().double()
            self._sum = grad if self._sum is None else self._sum + grad
            self._count += 1
            self._gates.grad = None

    def on_train_end(self, trainer, pl_module) -> None:
        self.adapter(pl_module).set_training_gates(None)

    def _run(self, trainer, pl_module) -> None:
        if self._count:  # nothing to report before the first backward
            super()._run(trainer, pl_module)

    def measure(self, trainer, pl_module) -> dict[str, Any]:
        mean = trainer.strategy.reduce(self._sum / self._count, reduce_op="mean")
        record = {
            "loss_effect_estimate": mean.tolist(),
            "batches": self._count,
            "top_heads": _top_heads(mean, self.top_k),
        }
        self._sum, self._count = None, 0
        return record

    def scalars(self, record):
        out = {}
        for layer, row in enumerate(record["loss_effect_estimate"]):
            out.update({f"L{layer}H{head}": v for head, v in enumerate(row)})
        return out

    def figure(self, record):
        return heatmap(record["loss_effect_estimate"], f"-dL/dgate at step {record['step']}", "estimated loss increase")
