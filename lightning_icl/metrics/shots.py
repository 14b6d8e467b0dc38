"""Per-shot averages: ICL curves (loss or accuracy as a function of the example index)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_icl.checks import check_positive


def per_shot_sums(values: Tensor, shot: Tensor, num_shots: int) -> tuple[Tensor, Tensor]:
    """Sum and count of ``values`` ``[N]`` per shot index ``shot`` ``[N]`` (in ``[0, num_shots)``)."""
    check_positive("num_shots", num_shots)
    if shot.dtype.is_floating_point or shot.dtype.is_complex or shot.dtype == torch.bool:
        raise ValueError(f"shot must be an integer tensor of shot indices, got {shot.dtype}")
    if shot.shape != values.shape:
        raise ValueError(f"shot must have the shape of values {tuple(values.shape)}, got {tuple(shot.shape)}")
    if shot.numel():
        low, high = torch.stack(list(torch.aminmax(shot))).tolist()  # one host sync
        if low < 0 or high >= num_shots:
            raise ValueError(f"shot indices must lie in [0, {num_shots}), got [{low}, {high}]")
    shot = shot.long()
    total = torch.zeros(num_shots, dtype=torch.float64, device=values.device).index_add_(0, shot, values.double())
    count = torch.zeros(num_shots, dtype=torch.float64, device=values.device).index_add_(
        0, shot, torch.ones_like(values, dtype=torch.float64)
    )
    return total, count


def per_shot_mean(values: Tensor, shot: Tensor, num_shots: int) -> Tensor:
    """``[num_shots]`` mean of ``values`` at each shot; NaN for shots never seen."""
    total, count = per_shot_sums(values, shot, num_shots)
    return total / count


class PerShotMean(Metric):
    """Running per-shot mean, summed across DDP ranks before dividing.

    ``compute()`` returns ``[num_shots]`` (NaN where no value was seen).

    Example:
        >>> m = PerShotMean(num_shots=3)
        >>> m.update(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 2, 2]))
        >>> m.compute()
        tensor([1.0000,    nan, 0.5000], dtype=torch.float64)
    """

    full_state_update = False

    def __init__(self, num_shots: int, **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive("num_shots", num_shots)
        self.num_shots = num_shots
        self.add_state("total", torch.zeros(num_shots, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_shots, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor, shot: Tensor) -> None:
        total, count = per_shot_sums(values.detach(), shot, self.num_shots)
        self.total += total
        self.count += count

    def compute(self) -> Tensor:
        return self.total / self.count

    def overall(self) -> Tensor:
        """Mean over every value seen, all shots together."""
        return self.total.sum() / self.count.sum()
