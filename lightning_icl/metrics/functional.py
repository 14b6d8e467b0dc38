"""Functional cores of the interpretability metrics: tensors in, tensors out.

Each has a :mod:`torchmetrics` wrapper in :mod:`lightning_icl.metrics` that adds
state and DDP gathering.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_icl.checks import check_choice, check_number, check_positive

DISTANCES = ("euclidean", "cosine")


def _check_k(k: int, n: int) -> None:
    check_positive("k", k)
    if k > n - 1:
        raise ValueError(
            f"k={k} neighbours but only {n - 1} other points to vote (N = {n}): lower k or evaluate more points"
        )


def knn_neighbours(features: Tensor, k: int = 10, distance: str = "euclidean") -> Tensor:
    """``[N, k]`` indices of each point's ``k`` nearest other points, closest first (leave-one-out)."""
    n = features.shape[0]
    check_choice("distance", distance, DISTANCES)
    if n < 2:
        raise ValueError(f"leave-one-out kNN needs at least 2 points, got {n}")
    _check_k(k, n)
    x = features.double()
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    dist = torch.cdist(x, x)  # [N, N]
    dist.fill_diagonal_(float("inf"))
    return dist.topk(k, dim=1, largest=False).indices


def knn_vote(nearest: Tensor, labels: Tensor) -> Tensor:
    """``[N]`` majority label of each point's neighbours ``nearest`` ``[N, k]`` (ties: the closer votes win)."""
    n, k = nearest.shape
    classes, dense = torch.unique(labels, return_inverse=True)
    votes = torch.zeros(n, classes.numel(), dtype=torch.float64, device=nearest.device)
    # a vote at rank r also carries a tie-break bonus below 1: earlier (closer) ranks weigh more
    bonus = (k - torch.arange(k, device=nearest.device, dtype=torch.float64)) / (k * (k + 1))
    votes.scatter_add_(1, dense[nearest], 1.0 + bonus.expand(n, k))
    return classes[votes.argmax(dim=1)]


def knn_predict(features: Tensor, labels: Tensor, k: int = 10, distance: str = "euclidean") -> Tensor:
    """Leave-one-out k-nearest-neighbour majority vote: ``[N]`` predicted labels.

    Each point's own label is never used for it. Ties between labels go to the label
    whose votes rank closer. ``k`` must leave that many other points (``k <= N - 1``).
    """
    return knn_vote(knn_neighbours(features, k, distance), labels)


def _layers(features: Tensor, labels: Tensor) -> tuple[Tensor, bool]:
    if labels.dim() != 1:
        raise ValueError(f"labels must be [N], got shape {tuple(labels.shape)}")
    stacked = features.dim() == 3
    layers = features if stacked else features[None]
    if layers.dim() != 3 or layers.shape[1] != labels.shape[0]:
        raise ValueError(
            f"features must be [N, D] or [L, N, D] with N = {labels.shape[0]}, got {tuple(features.shape)}"
        )
    return layers, stacked


def concept_decodability(
    features: Tensor, labels: Tensor, k: int = 10, distance: str = "euclidean", per_concept: bool = False
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Concept decodability (Han et al. 2024): leave-one-out kNN accuracy of the concept label.

    Args:
        features: ``[N, D]``, or ``[L, N, D]`` for L layers at once (e.g. the residual stream
            at the token before the answer).
        labels: ``[N]`` concept label of each point.
        k: neighbours (10 in the paper), at most ``N - 1``; ``distance``: ``"euclidean"`` or ``"cosine"``.
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
    layers, stacked = _layers(features, labels)
    correct = torch.stack([(knn_predict(x, labels, k, distance) == labels).float() for x in layers])  # [L, N]
    cd = correct.mean(dim=1)
    cd = cd if stacked else cd[0]
    if not per_concept:
        return cd
    concepts, dense = torch.unique(labels, return_inverse=True)
    counts = torch.bincount(dense, minlength=concepts.numel()).float()
    per = torch.zeros(correct.shape[0], concepts.numel(), device=correct.device).index_add_(1, dense, correct) / counts
    return cd, concepts, per if stacked else per[0]


def chance_level(labels: Tensor) -> float:
    """The accuracy of always guessing the most common concept: CD's floor without information
    (``1 / C`` for balanced concepts)."""
    counts = torch.bincount(torch.unique(labels, return_inverse=True)[1])
    return float(counts.max()) / labels.numel()


def decodability_baselines(
    features: Tensor,
    labels: Tensor,
    k: int = 10,
    distance: str = "euclidean",
    permutations: int = 100,
    bootstrap: int = 1000,
    level: float = 0.95,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """CD with what it should be compared against, per layer.

    - ``cd`` ``[L]``: leave-one-out kNN accuracy (as :func:`concept_decodability`);
    - ``interval`` ``[L, 2]``: a percentile bootstrap interval at ``level`` over points
      (resampling each point's right/wrong with replacement; it treats the points' votes as
      independent, which leave-one-out votes are not quite, so read it as the spread a new
      sample of prompts of this size would show);
    - ``permutation_mean`` and ``permutation_high`` ``[L]``: CD after shuffling the labels among
      the points (same features, same neighbours, ``permutations`` shuffles), its mean and its
      ``level`` quantile: what a layer reaches on this many points with no concept information;
    - ``p_value`` ``[L]``: the share of shuffles that reach the observed CD (with the observed one
      counted, so never 0);
    - ``chance``: the majority-concept rate (:func:`chance_level`).

    The neighbours are found once per layer, so each shuffle only re-votes: shuffles are cheap.
    """
    check_positive("permutations", permutations)
    check_positive("bootstrap", bootstrap)
    check_number("level", level, 0.0, 1.0, low_open=True, high_open=True)
    layers, _ = _layers(features, labels)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n = labels.numel()
    cd, interval, perm_mean, perm_high, p_value = [], [], [], [], []
    shuffles = torch.stack([torch.randperm(n, generator=g) for _ in range(permutations)]).to(labels.device)
    resamples = torch.randint(n, (bootstrap, n), generator=g).to(labels.device)
    tail = (1 - level) / 2
    for x in layers:
        nearest = knn_neighbours(x, k, distance)
        correct = (knn_vote(nearest, labels) == labels).double()
        observed = correct.mean()
        boot = correct[resamples].mean(1)
        shuffled = torch.stack([(knn_vote(nearest, labels[s]) == labels[s]).double().mean() for s in shuffles])
        cd.append(observed)
        interval.append(torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=boot.dtype, device=boot.device)))
        perm_mean.append(shuffled.mean())
        perm_high.append(torch.quantile(shuffled, level))
        p_value.append(((shuffled >= observed).sum() + 1) / (permutations + 1))
    return {
        "cd": torch.stack(cd).float(),
        "interval": torch.stack(interval).float(),
        "permutation_mean": torch.stack(perm_mean).float(),
        "permutation_high": torch.stack(perm_high).float(),
        "p_value": torch.stack(p_value).float(),
        "chance": torch.tensor(chance_level(labels)),
    }


def ridge_probe_accuracy(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, ridge: float = 1e-3
) -> Tensor:
    """Accuracy of a closed-form ridge-regression probe onto one-hot labels, fit on train, scored on test.

    Features are centred and scaled with the training statistics; ``ridge`` is relative to
    the mean eigenvalue of the training covariance. Test labels never seen in training count as wrong.
    """
    check_number("ridge", ridge, low=0.0, low_open=True)
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


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two same-sized tensors (ties broken by position).

    Example:
        >>> spearman(torch.tensor([0.1, 0.5, 0.3]), torch.tensor([1.0, 9.0, 2.0]))
        1.0
    """
    rank = lambda x: x.flatten().double().argsort().argsort().double()
    ra, rb = rank(a), rank(b)
    if ra.numel() < 2:
        return float("nan")
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
