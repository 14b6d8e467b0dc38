"""``HeadAblation``: the loss and accuracy effect of removing each head, measured during training."""

from __future__ import annotations

from typing import Any

import torch

from lightning_icl.checks import check_optional_positive, check_positive
from lightning_icl.interventions import ablation_effects, check_ablation_mode
from lightning_icl.plotting import ablation_figure

from .base import ICLCallback, rank_agreement_with


def top_heads(effect: torch.Tensor, k: int) -> list[list]:
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
        num_batches: held-out batches per measurement.
        every_n_steps, on_validation, dataloader_idx, tag (``**cadence``): see :class:`ICLCallback`.
    """

    name = "ablation"

    def __init__(
        self,
        mode: str = "zero",
        top_k: int = 5,
        heads_per_forward: int | None = None,
        num_batches: int = 1,
        **cadence,
    ) -> None:
        super().__init__(num_batches=num_batches, **cadence)
        check_ablation_mode(mode)
        check_optional_positive("heads_per_forward", heads_per_forward)
        check_positive("top_k", top_k)
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
            "top_heads": top_heads(loss, self.top_k),
        }
        from .attribution import HeadAttribution  # the partner's module imports this one

        record.update(
            rank_agreement_with(trainer, self, HeadAttribution, "loss_effect_estimate", loss, trainer.global_step)
        )
        return record

    def scalars(self, record):
        out = {"clean_loss": record["clean_loss"], "top1": record["top_heads"][0][2]}
        for layer, row in enumerate(record["loss_effect"]):
            out.update({f"L{layer}H{head}": v for head, v in enumerate(row)})
        if record.get("rank_agreement") is not None:
            out["rank_agreement"] = record["rank_agreement"]
        return out

    def figure(self, record):
        return ablation_figure(record)
