"""``ConceptDecodability``: which layers encode the task concept (Han et al. 2024), during training."""

from __future__ import annotations

from typing import Any

import torch

from lightning_icl.capture import CaptureSpec
from lightning_icl.checks import check_choice, check_flag, check_positive
from lightning_icl.metrics import KNNDecodability
from lightning_icl.metrics.functional import (
    DISTANCES,
    concept_decodability,
    decodability_baselines,
    ridge_probe_accuracy,
    stratified_halves,
)
from lightning_icl.plotting import decodability_figure

from .base import ICLCallback


class ConceptDecodability(ICLCallback):
    """Leave-one-out kNN decodability of the concept label at every layer.

    Features are the residual stream after each block at the token before the last
    answer of each held-out sequence. Logs ``decodability/layer_<l>``, ``decodability/peak``,
    ``decodability/peak_layer``, ``decodability/chance`` and ``decodability/permutation_layer_<l>``
    (and ``decodability/probe_layer_<l>`` with ``probe``); the record also holds CD per
    concept at the peak layer. Under DDP the features of all ranks are gathered first, so
    every rank computes the single-process value.

    What a CD value is compared against (see
    :func:`~lightning_icl.metrics.functional.decodability_baselines`): ``chance`` (the
    majority-concept rate, 1/C for balanced concepts); ``cd_permutation`` and
    ``cd_permutation_high`` per layer, the mean and 95% quantile of CD after shuffling the
    labels among the points (what this many points reach with no concept information: on few
    points it sits above chance); ``p_value`` per layer; and ``cd_interval``, a 95% bootstrap
    interval over points. A layer decodes the concept when its CD clears
    ``cd_permutation_high``, not merely chance.

    Args:
        k: neighbours (at most the number of held-out points minus one, checked when the fit
            starts); distance: ``"euclidean"`` or ``"cosine"``.
        permutations: label shuffles of the permutation baseline (0: none).
        bootstrap: resamples of the interval (0: none).
        probe: also fit a closed-form ridge probe on half the points and score it on the other half.
        by_shot: also measure CD at the token before *every* answer, so after 0, 1, ... examples
            (``cd_by_shot`` ``[L][shots]``; Han et al.'s decodability growing with the shots).
        num_batches: held-out batches per measurement.
        every_n_steps, on_validation, dataloader_idx, tag (``**cadence``): see :class:`ICLCallback`.
    """

    name = "decodability"

    def __init__(
        self,
        k: int = 10,
        distance: str = "euclidean",
        probe: bool = False,
        by_shot: bool = False,
        permutations: int = 100,
        bootstrap: int = 1000,
        num_batches: int = 4,
        **cadence,
    ) -> None:
        super().__init__(num_batches=num_batches, **cadence)
        check_positive("k", k)
        check_choice("distance", distance, DISTANCES)
        check_positive("permutations", permutations, minimum=0)
        check_positive("bootstrap", bootstrap, minimum=0)
        check_flag("probe", probe)
        check_flag("by_shot", by_shot)
        self.k, self.distance, self.probe, self.by_shot = k, distance, probe, by_shot
        self.permutations, self.bootstrap = permutations, bootstrap

    def check(self, trainer, pl_module, adapter, batch) -> None:
        if batch is None:
            return
        adapter.concept(batch)  # raises, naming the missing concept labels
        points = self.held_out_points(trainer, adapter, batch)
        if self.k > points - 1:
            raise ValueError(
                f"ConceptDecodability: k={self.k} neighbours but the {self.num_batches} held-out batch(es) hold "
                f"{points} points, so each has {points - 1} others: lower k or raise num_batches"
            )

    @torch.no_grad()
    def measure(self, trainer, pl_module) -> dict[str, Any]:
        adapter = self.adapter(pl_module)
        metric = KNNDecodability(self.k, self.distance).to(pl_module.device)
        for batch in self.eval_batches(trainer, pl_module):
            answers = adapter.answer_positions(batch)
            positions = answers if self.by_shot else answers[:, -1:]  # the token(s) before the answer(s)
            _, cap = adapter.forward(batch, capture=CaptureSpec(residual=True, positions=positions))
            features = torch.stack([cap.residual[layer] for layer in sorted(cap.residual)], dim=1)  # [B, L, P, D]
            metric.update(features.flatten(1, 2), adapter.concept(batch))  # one "layer" per (layer, shot)
        metric.sync(should_sync=trainer.world_size > 1)  # every rank now holds every point
        features, labels = metric.gathered()
        if trainer.world_size > 1:
            metric.unsync()
        grid = features.unflatten(1, (adapter.n_layers, -1)).transpose(0, 1)  # [L, N, P, D]
        layers = grid[:, :, -1]  # [L, N, D] at the final answer
        cd, concepts, per_concept = concept_decodability(layers, labels, self.k, self.distance, per_concept=True)
        peak = int(cd.argmax())
        record = {
            "cd": cd.tolist(),
            "peak_layer": peak,
            "peak": float(cd[peak]),
            "concepts": concepts.tolist(),
            "cd_per_concept_at_peak": per_concept[peak].tolist(),
            "num_points": int(labels.numel()),
            "k": self.k,
        }
        if self.permutations or self.bootstrap:
            # the same seed at every measurement, so the baselines move only with the features
            base = decodability_baselines(
                layers, labels, self.k, self.distance, max(self.permutations, 1), max(self.bootstrap, 1),
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
            record["chance"] = float(base["chance"])
            if self.permutations:
                record["cd_permutation"] = base["permutation_mean"].tolist()
                record["cd_permutation_high"] = base["permutation_high"].tolist()
                record["p_value"] = base["p_value"].tolist()
            if self.bootstrap:
                record["cd_interval"] = base["interval"].tolist()
        if self.by_shot:
            per_shot = grid.permute(0, 2, 1, 3).flatten(0, 1)  # [L * P, N, D]
            by_shot = concept_decodability(per_shot, labels, self.k, self.distance)
            record["cd_by_shot"] = by_shot.view(grid.shape[0], grid.shape[2]).tolist()
        if self.probe:
            train = stratified_halves(labels)  # fit on half of each concept's points, score on the rest
            test = ~train
            record["probe"] = [
                float(ridge_probe_accuracy(x[train], labels[train], x[test], labels[test])) for x in layers
            ]
        return record

    def scalars(self, record):
        out = {f"layer_{i}": v for i, v in enumerate(record["cd"])}
        out.update(peak=record["peak"], peak_layer=record["peak_layer"])
        out.update({f"probe_layer_{i}": v for i, v in enumerate(record.get("probe", []))})
        out.update({f"permutation_layer_{i}": v for i, v in enumerate(record.get("cd_permutation_high", []))})
        if "chance" in record:
            out["chance"] = record["chance"]
        return out

    def figure(self, record):
        return decodability_figure(self.history)
