"""``ICLCurves``: loss and accuracy per shot, per evaluation split and per concept, over training."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lightning_icl.checks import check_flag
from lightning_icl.metrics.shots import per_shot_sums
from lightning_icl.tasks.batch import ICLBatch

from .base import ICLCallback, reduce_padded


class ICLCurves(ICLCallback):
    """Per-shot loss (and accuracy) on every validation loader, and per concept.

    For He et al.'s four sets the splits are named by the batches (``id_seen`` ...); other
    loaders are ``loader<i>``. Logs ``curves/<split>/loss_shot0`` and ``.../loss_last`` (and
    ``acc``); the record, in ``curves.jsonl``, holds the whole curves, and with ``by_concept``
    the per-concept loss curves (e.g. one per basis in sparse regression). Sums are reduced
    over DDP ranks. (``icl_curves.jsonl`` is the module's own per-shot log, not this one's.)

    At validation on the package's :class:`~lightning_icl.ICLModule` the curves are read from
    the validation pass itself (its ``validation_step`` returns every answer's loss), so they
    cost no forward of their own and cover every batch that validation ran (``num_batches``
    does not apply). Every ``every_n_steps``, and on other models, the callback runs the first
    ``num_batches`` held-out batches itself.

    Args:
        by_concept: also keep a loss curve per concept label.
        num_batches: held-out batches per measurement.
        every_n_steps, on_validation, tag (``**cadence``): see :class:`ICLCallback`.
    """

    name = "curves"

    def __init__(
        self,
        by_concept: bool = False,
        num_batches: int = 4,
        **cadence,
    ) -> None:
        super().__init__(num_batches=num_batches, dataloader_idx=0, **cadence)  # it reads every loader
        check_flag("by_concept", by_concept)
        self.by_concept = by_concept
        self._from_validation: dict[int, _Sums] = {}  # sums read from the running validation pass

    def held_out_loaders(self, trainer, pl_module) -> list[int]:
        """Every loader when the callback runs batches itself (every ``every_n_steps``, or on a model
        whose validation pass it cannot read); none when it only reads ``ICLModule``'s validation."""
        from lightning_icl.module import ICLTaskModule

        if self.every_n_steps or not isinstance(pl_module, ICLTaskModule):
            return list(range(len(self.validation_loaders(trainer))))
        return []

    def check(self, trainer, pl_module, adapter, batch) -> None:
        if self.by_concept and batch is not None:
            adapter.concept(batch)  # raises, naming the missing concept labels

    def on_validation_start(self, trainer, pl_module) -> None:
        self._from_validation = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.on_validation or trainer.sanity_checking or not isinstance(batch, ICLBatch):
            return
        if not isinstance(outputs, Mapping) or "answer_shot" not in outputs:
            return  # a module whose validation_step returns no answer scores: measure() runs its own
        sums = self._from_validation.setdefault(dataloader_idx, _Sums(batch.split))
        rows = batch.mask.nonzero()[:, 0]  # the sequence of each answer, row-major like the outputs
        sums.add(outputs["answer_loss"], outputs["answer_correct"], outputs["answer_shot"], batch.concept[rows])

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict[str, Any]:
        collected, self._from_validation = self._from_validation, {}
        if not collected:  # not at validation, or a model whose validation pass we cannot read
            collected = self._run_batches(trainer, pl_module)
        record: dict[str, Any] = {"splits": {}}
        for _, sums in sorted(collected.items()):
            split = {m: _curve(trainer, s) for m, s in sums.metrics.items()}
            if self.by_concept:  # one [C, 2, S] reduction: ranks may have seen different concepts
                dense = reduce_padded(trainer, sums.concept_table())
                seen = (dense[:, 1].sum(1) > 0).nonzero()[:, 0].tolist()
                split["loss_by_concept"] = {str(c): _mean(dense[c]) for c in seen}
            record["splits"][sums.name] = split
        return record

    def _run_batches(self, trainer, pl_module) -> dict[int, _Sums]:
        adapter = self.adapter(pl_module)
        collected = {}
        for idx in range(len(self.validation_loaders(trainer))):
            sums = collected[idx] = _Sums(f"loader{idx}")
            for batch in self.eval_batches(trainer, pl_module, dataloader_idx=idx):
                name = batch.get("split") if isinstance(batch, Mapping) else getattr(batch, "split", None)
                sums.name = name or sums.name
                scored = adapter.score(adapter.forward(batch)[0], batch)
                concept = adapter.concept(batch) if self.by_concept else None
                rows = torch.arange(scored.loss.shape[0], device=scored.loss.device)[:, None].expand_as(scored.loss)
                sums.add(
                    scored.loss.flatten(),
                    None if scored.correct is None else scored.correct.flatten(),
                    scored.shot.flatten(),
                    None if concept is None else concept[rows.flatten()],
                )
        return collected

    def scalars(self, record):
        out = {}
        for split, curves in record["splits"].items():
            for metric in ("loss", "acc"):
                curve = [v for v in curves.get(metric, []) if v is not None]
                if curve:
                    out[f"{split}/{metric}_shot0"], out[f"{split}/{metric}_last"] = curve[0], curve[-1]
        return out


class _Sums:
    """Per-shot ``[2, S]`` (sum, count) of each metric, over all answers and per concept, for one split."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.metrics: dict[str, torch.Tensor] = {}
        self.by_concept: dict[int, torch.Tensor] = {}

    def concept_table(self) -> torch.Tensor:
        """``[C, 2, S]`` per-concept sums, zeros for concepts not seen."""
        if not self.by_concept:
            loss = self.metrics["loss"]
            return loss.new_zeros(1, *loss.shape)
        s = max(t.shape[1] for t in self.by_concept.values())
        table = next(iter(self.by_concept.values())).new_zeros(max(self.by_concept) + 1, 2, s)
        for c, t in self.by_concept.items():
            table[c, :, : t.shape[1]] = t
        return table

    def add(self, loss, correct, shot, concept) -> None:
        """Answers ``[N]``: loss, correctness (or None), shot index and concept (or None)."""
        n_shots = int(shot.max()) + 1 if shot.numel() else 1
        values = {"loss": loss} | ({"acc": correct} if correct is not None else {})
        for metric, v in values.items():
            total, count = per_shot_sums(v.float(), shot, n_shots)
            self.metrics[metric] = _add(self.metrics.get(metric), torch.stack([total, count]))
        if concept is not None:
            for c in concept.unique().tolist():
                keep = concept == c
                total, count = per_shot_sums(loss[keep].float(), shot[keep], n_shots)
                self.by_concept[c] = _add(self.by_concept.get(c), torch.stack([total, count]))


def _add(a, b):
    if a is None:
        return b
    if a.shape[1] < b.shape[1]:  # more shots in this batch (e.g. a curriculum)
        a, b = b, a
    a = a.clone()
    a[:, : b.shape[1]] += b
    return a


def _mean(sums: torch.Tensor) -> list[float | None]:
    mean = sums[0] / sums[1]
    return [None if torch.isnan(v) else float(v) for v in mean]


def _curve(trainer, sums: torch.Tensor) -> list[float | None]:
    return _mean(reduce_padded(trainer, sums))
