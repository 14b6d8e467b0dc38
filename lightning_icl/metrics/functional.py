"""Functional cores of the interpretability metrics: tensors in, tensors out.

Each has a :mod:`torchmetrics` wrapper in :mod:`lightning_icl.metrics` that adds
state and DDP gathering.
"""

from __future__ import annotations

import torch
from torch import Tensor

DISTANCES = ("euclidean", "cosine")


def knn_predict(features: Tensor, labels: Tensor, k: int = 10, distance: str = "euclidean") -> Tensor:
    """Leave-one-out k-nearest-neighbour majority vote: ``[N]`` predicted labels.

    Each point's own label is never used for it. Ties between labels go to the label
    whose votes rank closer. ``k`` is capped at ``N - 1``.
    """
    n = features.shape[0]
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if n < 2:
        raise ValueError(f"leave-one-out kNN needs at least 2 points, got {n}")
    x = features.double()
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    dist = torch.cdist(x, x)  # [N, N]
    dist.fill_diagonal_(float("inf"))
    k = min(k, n - 1)
    nearest = dist.topk(k, dim=1, largest=False).indices  # [N, k], closest first
    classes, dense = torch.unique(labels, return_inverse=True)
    votes = torch.zeros(n, classes.numel(), dtype=torch.float64, device=features.device)
    # a vote at rank r also carries a tie-break bonus below 1: earlier (closer) ranks weigh more
    bonus = (k - torch.arange(k, device=features.device, dtype=torch.float64)) / (k * (k + 1))
    weights = 1.0 + bonus.expand(n, k)
    votes.scatter_add_(1, dense[nearest], weights)
    return classes[votes.argmax(dim=1)]


def concept_decodability(
    features: Tensor, labels: Tensor, k: int = 10, distance: str = "euclidean", per_concept: bool = False
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Concept decodability (Han et al. 2024): leave-one-out kNN accuracy of the concept label.

    Args:
        features: ``[N, D]``, or ``[L, N, D]`` for L layers at once (e.g. the residual stream
            at the token before the answer).
        labels: ``[N]`` concept label of each point.
        k: neighbours (10 in the paper); ``distance``: ``"euclidean"`` or ``"cosine"``.
        per_concept: also return the accuracy per concept.

    Returns:
        CD, a scalar (or ``[L]``): the fraction of points whose concept the vote recovers.
        With ``per_concept``: ``(cd, concepts [C], cd_per_concept [C] or [L, C])``.

    Example:
        >>> x = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
        >>> y = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> concept_decodability(x, y, k=2)
        tensor(1.)
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be [N], got shape {tuple(labels.shape)}")
    stacked = features.dim() == 3
    layers = features if stacked else features[None]
    if layers.dim() != 3 or layers.shape[1] != labels.shape[0]:
        raise ValueError(
            f"features must be [N, D] or [L, N, D] with N = {labels.shape[0]}, got {tuple(features.shape)}"
        )
    correct = torch.stack([(knn_predict(x, labels, k, distance) == labels).float() for x in layers])  # [L, N]
    cd = correct.mean(dim=1)
    cd = cd if stacked else cd[0]
    if not per_concept:
        return cd
    concepts, dense = torch.unique(labels, return_inverse=True)
    counts = torch.bincount(dense, minlength=concepts.numel()).float()
    per = torch.zeros(correct.shape[0], concepts.numel(), device=correct.device).index_add_(1, dense, correct) / counts
    return cd, concepts, per if stacked else per[0]


def ridge_probe_accuracy(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, ridge: float = 1e-3
) -> Tensor:
    """Accuracy of a closed-form ridge-regression probe onto one-hot labels, fit on train, scored on test.

    Features are centred and scaled with the training statistics; ``ridge`` is relative to
    the mean eigenvalue of the training covariance. Test labels never seen in training count as wrong.
    """
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    classes, dense = torch.unique(train_labels, return_inverse=True)
    x, xt = train_features.double(), test_features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-12)
    x, xt = (x - mean) / std, (xt - mean) / std
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
    xt = torch.cat([xt, torch.ones(xt.shape[0], 1, dtype=xt.dtype, device=xt.device)], 1)
    targets = torch.nn.functional.one_hot(dense, classes.numel()).double()
    gram = x.T @ x
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=x.dtype, device=x.device), x.T @ targets)
    predicted = classes[(xt @ w).argmax(1)]
    return (predicted == test_labels).float().mean()


def stratified_halves(labels: Tensor) -> Tensor:
    """``[N]`` bool: every other point *of each label* (in order) is True, so both halves hold every
    label with at least two points, whatever the order of the points (e.g. labels cycling through
    the concepts, where every other point overall would put whole concepts in one half)."""
    train = torch.zeros_like(labels, dtype=torch.bool)
    for label in labels.unique():
        idx = (labels == label).nonzero()[:, 0]
        train[idx[::2]] = True
    return train
