"""``CircuitOverlap``: which heads do different task families share (Merullo et al. 2024)?"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_icl.checks import check_choice, check_number, check_positive, is_integer
from lightning_icl.interventions import ablation_effects, check_ablation_mode, head_attribution
from lightning_icl.plotting import circuits_figure

from .base import ICLCallback

SCORES = ("ablation", "attribution")


def top_heads(effect: torch.Tensor, fraction: float) -> set[tuple[int, int]]:
    """The ``ceil(fraction * L * H)`` heads of largest effect magnitude (at least one), as ``(layer, head)``.

    Magnitude, not sign: a head whose removal lowers the loss takes part in the computation too
    (as negative heads do in circuits found by patching)."""
    n_h = effect.shape[1]
    k = max(1, int(torch.tensor(fraction * effect.numel()).ceil()))
    order = effect.abs().flatten().argsort(descending=True, stable=True)[:k].tolist()
    return {(i // n_h, i % n_h) for i in order}


def jaccard(a: set, b: set) -> float:
    """``|a ∩ b| / |a ∪ b|`` (1 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.flatten().argsort().argsort().double()


class CircuitOverlap(ICLCallback):
    """Per task family, the top ``top_fraction`` of heads by the magnitude of their ablation (or
    attribution) effect, and how much the families' head sets overlap, over training.

    Families are groups of validation loaders: ``families={"modular": 0, "bitwise": 4}`` (a loader
    index or a list of them), else the DataModule's ``family_loaders()`` (as
    :class:`~lightning_icl.MultiFamilyDataModule` has; its first loader per family, e.g. the
    in-distribution split), else loaders grouped by the part of their batches' ``split`` before
    a ``/``. The effect of a head is the mean answer-loss increase when it is ablated
    (``score="ablation"``, ``mode`` zero/mean/resample, via
    :func:`~lightning_icl.interventions.ablation_effects`) or its estimate from integrated
    gradients along each head's gate (``score="attribution"``, ``attribution_steps`` points, via
    :func:`~lightning_icl.interventions.head_attribution`).

    Logs ``circuits/jaccard/<a>__<b>`` for every pair of families, ``circuits/shared_over_union``
    (heads in every family's set over heads in any), and ``circuits/rank_corr/<a>__<b>`` (Spearman
    correlation of the two families' effects over all heads). The record keeps each family's
    ``[L, H]`` effects and head set. Under DDP the effects are averaged over every rank's answers.

    Args:
        families: family name -> validation loader index or indices (see above).
        top_fraction: share of all heads in each family's set (Merullo et al. use the top 2%
            of GPT-2 Medium's heads; small models need a larger share).
        score: ``"ablation"`` or ``"attribution"``.
        mode: the ablation (``"zero"``, ``"mean"``, ``"resample"``).
        attribution_steps: integration points of ``score="attribution"``.
        num_batches: held-out batches per measurement, from each family's loaders.
        every_n_steps, on_validation, tag (``**cadence``): see :class:`ICLCallback`.
    """

    name = "circuits"

    def __init__(
        self,
        families: dict[str, int | list[int]] | None = None,
        top_fraction: float = 0.25,
        score: str = "ablation",
        mode: str = "mean",
        attribution_steps: int = 2,
        num_batches: int = 1,
        **cadence,
    ) -> None:
        super().__init__(num_batches=num_batches, dataloader_idx=0, **cadence)  # it reads every loader
        check_positive("attribution_steps", attribution_steps)
        self.attribution_steps = attribution_steps
        check_number("top_fraction", top_fraction, 0.0, 1.0, low_open=True)
        check_choice("score", score, SCORES)
        check_ablation_mode(mode)
        if families is not None:
            if not isinstance(families, Mapping):
                raise ValueError(f"families must be a mapping name -> loader index or indices, got {families!r}")
            families = {name: [idx] if is_integer(idx) else idx for name, idx in families.items()}
            if len(families) < 2:
                raise ValueError(f"families must name at least two families, got {list(families)}")
            for name, idxs in families.items():
                if isinstance(idxs, str) or not isinstance(idxs, Sequence) or not idxs:
                    raise ValueError(f"families[{name!r}] must be loader indices >= 0, got {idxs!r}")
                if any(not is_integer(i) or i < 0 for i in idxs):
                    raise ValueError(f"families[{name!r}] must be loader indices >= 0, got {list(idxs)}")
            families = {name: list(idxs) for name, idxs in families.items()}
        self.families, self.top_fraction, self.score, self.mode = families, top_fraction, score, mode

    def family_loaders(self, trainer) -> dict[str, list[int]]:
        """Family name -> validation loader indices, resolved as the class docstring says."""
        loaders = self.validation_loaders(trainer)
        if self.families is not None:
            found = self.families
        elif hasattr(trainer.datamodule, "family_loaders"):
            found = {name: idxs[:1] for name, idxs in trainer.datamodule.family_loaders().items()}
        else:
            found = {}
            for idx, loader in enumerate(loaders):
                split = getattr(next(iter(loader)), "split", None)
                if isinstance(split, str) and "/" in split:
                    found.setdefault(split.split("/", 1)[0], [idx])
        if len(found) < 2:
            raise ValueError(
                "CircuitOverlap needs at least two task families: pass families={name: loader index}, or use a "
                "DataModule with family_loaders() (MultiFamilyDataModule) or splits named '<family>/<split>'"
            )
        for name, idxs in found.items():
            if max(idxs) >= len(loaders):
                raise ValueError(f"families[{name!r}] names loader {max(idxs)} but there are {len(loaders)}")
        return found

    def held_out_loaders(self, trainer, pl_module) -> list[int]:
        """Every family's loaders (``num_batches`` from each); raises when fewer than two families are found."""
        return sorted({idx for idxs in self.family_loaders(trainer).values() for idx in idxs})

    def check(self, trainer, pl_module, adapter, batch) -> None:
        self.family_loaders(trainer)  # raises when fewer than two families can be found

    def _family_effect(self, trainer, pl_module, loader_ids: list[int]) -> torch.Tensor:
        adapter = self.adapter(pl_module)
        n = adapter.n_layers * adapter.n_heads
        sums = torch.zeros(n + 1, dtype=torch.float64, device=pl_module.device)  # weighted effects, answers
        for idx in loader_ids:
            for batch in self.eval_batches(trainer, pl_module, dataloader_idx=idx):
                count = adapter.answer_positions(batch).numel()
                if self.score == "ablation":
                    effect = ablation_effects(adapter, batch, self.mode).loss_effect
                else:
                    effect = head_attribution(adapter, batch, self.mode, "integrated", self.attribution_steps)
                sums[:n] += effect.flatten().to(sums) * count
                sums[n] += count
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        return (sums[:n] / sums[n]).view(adapter.n_layers, adapter.n_heads)

    def measure(self, trainer, pl_module) -> dict[str, Any]:
        families = self.family_loaders(trainer)
        effects = {name: self._family_effect(trainer, pl_module, idxs) for name, idxs in families.items()}
        sets = {name: top_heads(e, self.top_fraction) for name, e in effects.items()}
        names = list(families)
        matrix = [[jaccard(sets[a], sets[b]) for b in names] for a in names]
        shared = set.intersection(*sets.values())
        union = set.union(*sets.values())
        rank_corr = {}
        for a, b in itertools.combinations(names, 2):
            corr = torch.corrcoef(torch.stack([_ranks(effects[a]), _ranks(effects[b])]))[0, 1]
            rank_corr[f"{a}__{b}"] = float(corr) if torch.isfinite(corr) else None
        return {
            "score": self.score,
            "mode": self.mode if self.score == "ablation" else None,
            "top_fraction": self.top_fraction,
            "families": names,
            "effects": {name: e.tolist() for name, e in effects.items()},
            "top_heads": {name: sorted(map(list, s)) for name, s in sets.items()},
            "jaccard": matrix,
            "shared_heads": sorted(map(list, shared)),
            "shared_over_union": len(shared) / len(union) if union else 1.0,
            "rank_corr": rank_corr,
        }

    def scalars(self, record):
        names = record["families"]
        out = {"shared_over_union": record["shared_over_union"]}
        for i, j in itertools.combinations(range(len(names)), 2):
            out[f"jaccard/{names[i]}__{names[j]}"] = record["jaccard"][i][j]
        out.update({f"rank_corr/{k}": v for k, v in record["rank_corr"].items() if v is not None})
        return out

    def figure(self, record):
        return circuits_figure(record)
