"""``KNNDecodability``: concept decodability (kNN over layer representations) as a torchmetrics
metric; features are gathered across ranks, then classified by kNN."""

from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_icl.checks import check_choice, check_positive

from .functional import DISTANCES, concept_decodability


class KNNDecodability(Metric):
    """Leave-one-out kNN decodability of the concept label, over everything seen since the last reset.

    ``update(features, labels)`` takes ``[N, D]`` or ``[N, L, D]`` (L layers at once) and ``[N]``.
    Under DDP, ``compute()`` gathers every rank's points first, so each rank gets the value
    one process would compute on all of them. ``compute()`` returns CD (a scalar, or ``[L]``).

    Example:
        >>> metric = KNNDecodability(k=2)
        >>> metric.update(torch.tensor([[0.0], [0.1], [0.2]]), torch.tensor([0, 0, 0]))
        >>> metric.update(torch.tensor([[5.0], [5.1], [5.2]]), torch.tensor([1, 1, 1]))
        >>> metric.compute()
        tensor(1.)
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, k: int = 10, distance: str = "euclidean", **kwargs) -> None:
        super().__init__(**kwargs)
        check_positive("k", k)
        check_choice("distance", distance, DISTANCES)
        self.k, self.distance = k, distance
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, labels: Tensor) -> None:
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"features have {features.shape[0]} points, labels {labels.shape[0]}")
        self.features.append(features.detach().float())
        self.labels.append(labels.detach().long())

    def gathered(self) -> tuple[Tensor, Tensor]:
        """Every point seen (across ranks once synced): ``[N, (L,) D]`` and ``[N]``."""
        return dim_zero_cat(self.features), dim_zero_cat(self.labels)

    def compute(self) -> Tensor:
        features, labels = self.gathered()
        if features.dim() == 3:
            features = features.transpose(0, 1)  # [L, N, D]
        return concept_decodability(features, labels, k=self.k, distance=self.distance)


__all__ = ["KNNDecodability"]
