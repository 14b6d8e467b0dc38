"""``ICLCurves``: loss and accuracy per shot, per evaluation split and per concept, over training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_icl.metrics.shots import per_shot_sums

from .base import ICLCallback


class ICLCurves(ICLCallback):
    """Per-shot loss (and accuracy) on every validation loader, and per concept.

    For He et al.'s four sets the splits are named by the batches (``id_seen`` ...); other
    loaders are ``loader<i>``. Logs ``icl_curves/<split>/loss_shot<k>`` at the first and last
    shot; the record holds the whole curves, and with ``by_concept`` the per-concept loss curves
    (e.g. one per basis in sparse regression). Sums are reduced over DDP ranks.
    """

    name = "icl_curves"

    def __init__(
        self,
        by_concept: bool = False,
        every_n_steps: int | None = None,
        on_validation: bool = True,
        num_batches: int = 4,
    ) -> None:
        super().__init__(every_n_steps, on_validation, num_batches)
        self.by_concept = by_concept

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict[str, Any]:
        adapter = self.adapter(pl_module)
        record: dict[str, Any] = {"splits": {}}
        for idx in range(len(self.validation_loaders(trainer))):
            name, sums, concept_sums = f"loader{idx}", {}, {}
            for batch in self.eval_batches(trainer, pl_module, dataloader_idx=idx):
                name = batch.get("split", name) if isinstance(batch, Mapping) else getattr(batch, "split", name)
                scored = adapter.score(adapter.forward(batch)[0], batch)
                n_shots = int(scored.shot.max()) + 1
                values = {"loss": scored.loss} | ({"acc": scored.correct} if scored.correct is not None else {})
                for metric, v in values.items():
                    total, count = per_shot_sums(v.flatten().float(), scored.shot.flatten(), n_shots)
                    sums[metric] = _add(sums.get(metric), torch.stack([total, count]))
                if self.by_concept:
                    concept = adapter.concept(batch)
                    for c in concept.unique().tolist():
                        rows = concept == c
                        total, count = per_shot_sums(
                            scored.loss[rows].flatten().float(), scored.shot[rows].flatten(), n_shots
                        )
                        concept_sums[c] = _add(concept_sums.get(c), torch.stack([total, count]))
            split = {m: _curve(trainer, s) for m, s in sums.items()}
            if self.by_concept:
                split["loss_by_concept"] = {str(c): _curve(trainer, s) for c, s in sorted(concept_sums.items())}
            record["splits"][name] = split
        return record

    def scalars(self, record):
        out = {}
        for split, curves in record["splits"].items():
            for metric in ("loss", "acc"):
                curve = [v for v in curves.get(metric, []) if v is not None]
                if curve:
                    out[f"{split}/{metric}_shot0"], out[f"{split}/{metric}_last"] = curve[0], curve[-1]
        return out


def _add(a, b):
    if a is None:
        return b
    if a.shape[1] < b.shape[1]:  # more shots in this batch (e.g. a curriculum)
        a, b = b, a
    a = a.clone()
    a[:, : b.shape[1]] += b
    return a


def _curve(trainer, sums: torch.Tensor) -> list[float | None]:
    if trainer.world_size > 1:  # ranks may have seen different shot counts: pad to the longest first
        longest = int(trainer.strategy.all_gather(torch.tensor(sums.shape[1], device=sums.device)).max())
        sums = torch.nn.functional.pad(sums, (0, longest - sums.shape[1]))
    sums = trainer.strategy.reduce(sums, reduce_op="sum")
    mean = sums[0] / sums[1]
    return [None if torch.isnan(v) else float(v) for v in mean]
