"""Hard-concrete L0 masks and the heuristic core of many pruned subnetworks (Bhaskar et al. 2024).

:class:`HardConcrete` is the gate distribution of Louizos et al. (2018) that
:class:`~lightning_icl.subnetwork.SubnetworkPruning` learns over heads and MLPs. The
functions below read a set of learned masks: how often each head is kept
(:func:`keep_frequency`), the heads every (or nearly every) subnetwork keeps
(:func:`heuristic_core`) and how small a subnetwork can be before it loses accuracy
(:func:`effective_size`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_icl.checks import check_number, index_list, is_number


class HardConcrete(nn.Module):
    """Hard-concrete gates z in [0, 1], one per unit of ``shape``, with a closed-form L0 norm.

    A sample stretches a binary-concrete variable to ``(l, r)`` and clips it to [0, 1], so it
    is exactly 0 or 1 with non-zero probability yet differentiable in ``log_alpha``:
    ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, ``z = clip(s (r - l) + l, 0, 1)``,
    ``u ~ U(0, 1)`` (Louizos et al. 2018).

    Args:
        shape: the units, e.g. ``(L, H)`` for heads.
        beta: temperature (2/3).
        stretch: ``(l, r)`` with ``l < 0`` and ``r > 1`` ((-0.1, 1.1)).
        init_mean, init_std: ``log_alpha ~ N(init_mean, init_std)``; 10 starts with every unit kept.
    """

    def __init__(
        self,
        shape: int | Sequence[int],
        beta: float = 2 / 3,
        stretch: tuple[float, float] = (-0.1, 1.1),
        init_mean: float = 10.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        shape = index_list("shape", shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"shape must be one or more sizes >= 1, got {shape}")
        shape = tuple(shape)
        check_number("beta", beta, low=0.0, low_open=True)
        pair = list(stretch) if isinstance(stretch, (tuple, list)) else []
        finite = len(pair) == 2 and all(is_number(x) and math.isfinite(x) for x in pair)
        if not finite or not pair[0] < 0 < 1 < pair[1]:
            raise ValueError(f"stretch must be (l, r) with l < 0 < 1 < r, got {stretch!r}")
        low, high = pair
        check_number("init_mean", init_mean)
        check_number("init_std", init_std, low=0.0)
        self.beta, self.low, self.high = beta, low, high
        self.log_alpha = nn.Parameter(torch.empty(shape).normal_(init_mean, init_std))

    def sample(self, batch_shape: Sequence[int] = (), generator: torch.Generator | None = None) -> Tensor:
        """``[*batch_shape, *shape]`` reparameterised samples (gradients reach ``log_alpha``)."""
        shape = (*batch_shape, *self.log_alpha.shape)
        u = torch.rand(shape, generator=generator, device=self.log_alpha.device)
        u = u.clamp(1e-6, 1 - 1e-6)  # log u - log(1 - u) stays finite
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def deterministic(self) -> Tensor:
        """The test-time gate ``clip(sigmoid(log_alpha) (r - l) + l, 0, 1)``, in [0, 1]."""
        return (torch.sigmoid(self.log_alpha) * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def binary(self) -> Tensor:
        """Kept (True) or pruned (False) per unit: the deterministic gate above 1/2."""
        return self.deterministic() > 0.5

    def expected_l0(self) -> Tensor:
        """``P(z != 0)`` per unit: ``sigmoid(log_alpha - beta log(-l / r))``."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.low / self.high))


def keep_frequency(masks: Sequence[Tensor]) -> Tensor:
    """``[L, H]`` fraction of the subnetworks (masks ``[L, H]``, 1 = kept) that keep each head."""
    if len(masks) == 0:
        raise ValueError("masks is empty: give at least one [L, H] mask")
    tensors = [torch.as_tensor(m, dtype=torch.float64) for m in masks]
    shapes = sorted({tuple(m.shape) for m in tensors})
    if len(shapes) > 1:
        raise ValueError(f"masks must all have one shape [L, H], got shapes {shapes}")
    stacked = torch.stack(tensors)
    if stacked.dim() != 3:
        raise ValueError(f"masks must each be [L, H], got {tuple(stacked.shape[1:])}")
    low, high = float(stacked.min()), float(stacked.max())
    if not (low >= 0 and high <= 1):  # NaN fails too
        raise ValueError(f"masks must hold values in [0, 1] (1 = kept), got values from {low} to {high}")
    return stacked.mean(dim=0)


def heuristic_core(masks: Sequence[Tensor], fraction: float = 1.0) -> Tensor:
    """``[L, H]`` bool: the heads kept by at least ``fraction`` of the subnetworks (1.0: by all)."""
    check_number("fraction", fraction, 0.0, 1.0, low_open=True)
    return keep_frequency(masks) >= fraction - 1e-9


def effective_size(
    results: Sequence[Mapping],
    full_acc: float | Mapping[str, float],
    margin: float = 0.03,
    split: str = "id_seen",
) -> float:
    """100 minus the largest sparsity (in %) whose subnetworks stay within ``margin`` of the full model.

    ``results`` holds one record per pruned subnetwork with ``target_sparsity``, the achieved
    ``sparsity`` (both fractions) and ``accuracy`` (split -> accuracy), as in ``mask.json``.
    Records are grouped by target sparsity (the seeds of one setting); a group qualifies when
    its mean accuracy on ``split`` is at least the full model's minus ``margin`` (a pruned model
    may do better than the full one), and counts at its mean achieved sparsity. With no
    qualifying group the effective size is 100: the task needs the whole model.
    """
    check_number("margin", margin, low=0.0)
    if not isinstance(split, str):
        raise ValueError(f"split must be a split name, got {split!r}")
    if len(results) == 0:
        raise ValueError("results is empty: give at least one record of a pruned subnetwork")
    if isinstance(full_acc, Mapping):
        if split not in full_acc:
            raise ValueError(f"full_acc has no accuracy for split {split!r}, only for {sorted(full_acc)}")
        full = full_acc[split]
        check_number(f"full_acc[{split!r}]", full, 0.0, 1.0)
    else:
        check_number("full_acc", full_acc, 0.0, 1.0)
        full = float(full_acc)
    groups: dict[float, list[Mapping]] = defaultdict(list)
    for i, record in enumerate(results):
        if not isinstance(record, Mapping) or not {"target_sparsity", "sparsity", "accuracy"} <= set(record):
            raise ValueError(f"results[{i}] must hold target_sparsity, sparsity and accuracy (as in mask.json)")
        if split not in record["accuracy"]:
            raise ValueError(f"split {split!r} is not among the results' splits {sorted(record['accuracy'])}")
        groups[round(float(record["target_sparsity"]), 6)].append(record)
    best = 0.0
    for records in groups.values():
        acc = sum(r["accuracy"][split] for r in records) / len(records)
        if acc >= full - margin:
            best = max(best, sum(float(r["sparsity"]) for r in records) / len(records))
    return 100.0 * (1.0 - best)


__all__ = ["HardConcrete", "effective_size", "heuristic_core", "keep_frequency"]
