import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_icl.metrics import KNNDecodability
from lightning_icl.metrics.functional import concept_decodability, knn_predict, ridge_probe_accuracy


def clusters(n_per, centers, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = centers.shape[1]
    x = torch.cat([c + spread * torch.randn(n_per, d, generator=g) for c in centers])
    y = torch.arange(centers.shape[0]).repeat_interleave(n_per)
    return x, y


def loop_knn(x, y, k):
    """Independent reference: plain Python leave-one-out kNN with majority vote (no ties by construction)."""
    preds = []
    for i in range(len(x)):
        d = [(float(((x[i] - x[j]) ** 2).sum()), int(y[j])) for j in range(len(x)) if j != i]
        d.sort()
        votes = {}
        for _, label in d[:k]:
            votes[label] = votes.get(label, 0) + 1
        preds.append(max(votes, key=votes.get))
    return torch.tensor(preds)


def test_separable_clusters_are_perfectly_decodable():
    x, y = clusters(30, torch.eye(4) * 10, 0.5)
    assert concept_decodability(x, y, k=10) == 1.0
    assert concept_decodability(x, y, k=10, distance="cosine") == 1.0


def test_random_labels_are_at_chance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    y = torch.randint(4, (2000,), generator=g)
    assert abs(concept_decodability(x, y, k=10).item() - 0.25) < 0.04


@pytest.mark.parametrize("k, classes", [(1, 5), (3, 2), (9, 2)])
def test_matches_a_plain_loop(k, classes):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(60, 3, generator=g)
    y = (x[:, 0] > 0).long() if classes == 2 else torch.randint(classes, (60,), generator=g)
    expected = loop_knn(x, y, k)
    assert torch.equal(knn_predict(x, y, k), expected)
    assert concept_decodability(x, y, k=k) == pytest.approx((expected == y).float().mean().item())


def test_cosine_ignores_scale_and_euclidean_does_not():
    x, y = clusters(20, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 0.1)
    scaled = x * torch.linspace(0.1, 50, len(x))[:, None]
    assert concept_decodability(scaled, y, distance="cosine") == concept_decodability(x, y, distance="cosine")


def test_per_concept_and_layers():
    sep, y = clusters(20, torch.eye(3) * 10, 0.3)
    mixed = torch.randn(60, 3, generator=torch.Generator().manual_seed(1))
    layers = torch.stack([mixed, sep])  # [L, N, D]
    cd = concept_decodability(layers, y)
    assert cd.shape == (2,) and cd[1] == 1.0 and cd[0] < 0.8
    assert cd[0] == concept_decodability(mixed, y)
    # concept 0 made separable in an otherwise random layer
    half = mixed.clone()
    half[:20] += 100
    total, concepts, per = concept_decodability(half, y, per_concept=True)
    assert concepts.tolist() == [0, 1, 2] and per[0] == 1.0 and per[1:].max() < 1.0
    assert total == pytest.approx(per.mean().item())  # equal-sized concepts


def test_ridge_probe():
    x, y = clusters(50, torch.eye(5) * 3, 0.5)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:150], perm[150:]
    assert ridge_probe_accuracy(x[train], y[train], x[test], y[test]) == 1.0
    noise = torch.randn(250, 5, generator=torch.Generator().manual_seed(2))
    assert ridge_probe_accuracy(noise[train], y[train], noise[test], y[test]) < 0.45


def test_stratified_halves_put_every_concept_on_both_sides():
    from lightning_icl.metrics.functional import stratified_halves

    labels = torch.arange(48) % 8  # balanced batches cycle through the concepts
    train = stratified_halves(labels)
    assert train.sum() == 24
    for c in range(8):
        assert train[labels == c].sum() == 3 and (~train)[labels == c].sum() == 3
    # with separable concepts the probe on these halves is exact (every other point overall scored 0)
    x = torch.nn.functional.one_hot(labels, 8).double() * 5 + 0.1 * torch.randn(48, 8, dtype=torch.float64)
    assert ridge_probe_accuracy(x[train], labels[train], x[~train], labels[~train]) == 1.0
    assert ridge_probe_accuracy(x[::2], labels[::2], x[1::2], labels[1::2]) == 0.0


def test_bad_input_is_named():
    x, y = torch.randn(10, 2), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="distance must be one of"):
        concept_decodability(x, y, distance="manhattan")
    with pytest.raises(ValueError, match="features must be"):
        concept_decodability(x[:5], y)
    with pytest.raises(ValueError, match="at least 2 points"):
        concept_decodability(x[:1], y[:1])
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        KNNDecodability(k=0)
    with pytest.raises(ValueError, match="ridge must be a finite number > 0"):
        ridge_probe_accuracy(x, y, x, y, ridge=0.0)


def test_metric_accumulates_like_the_functional_form():
    x, y = clusters(25, torch.eye(4) * 2, 1.0)
    layers = torch.stack([x, x.flip(1) * 0.5 + 0.1 * torch.randn_like(x)], dim=1)  # [N, L, D]
    metric = KNNDecodability(k=5)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    for chunk in perm.split(30):
        metric.update(layers[chunk], y[chunk])
    expected = concept_decodability(layers[perm].transpose(0, 1), y[perm], k=5)
    torch.testing.assert_close(metric.compute(), expected)
    metric.reset()
    metric.update(x, y)
    assert metric.compute() == concept_decodability(x, y, k=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, x, y, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metric = KNNDecodability(k=7)
    half = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    metric.update(x[half], y[half])
    out[rank] = metric.compute().item()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_compute_the_single_process_value():
    x, y = clusters(40, torch.eye(3) * 1.5, 1.0, seed=3)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), x, y, out), nprocs=2, join=True)
    single = concept_decodability(x, y, k=7).item()
    assert out[0] == out[1] == pytest.approx(single)
    assert 0.5 < single < 1.0  # neither trivial nor chance: gathering matters


def test_k_must_leave_that_many_other_points():
    x, y = torch.randn(8, 2), torch.arange(8) % 2
    with pytest.raises(ValueError, match="k=10000 neighbours but only 7 other points"):
        concept_decodability(x, y, k=10000)
    assert 0 <= concept_decodability(x, y, k=7) <= 1  # the largest k that fits


def test_baselines_tell_decodable_layers_from_chance_on_few_points():
    from lightning_icl.metrics.functional import chance_level, decodability_baselines

    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 4  # 16 points per concept, balanced
    noise = torch.randn(64, 8, generator=g)
    separable = noise * 0.1 + torch.eye(8)[y] * 3
    base = decodability_baselines(torch.stack([noise, separable]), y, k=10, permutations=200, bootstrap=500)
    assert chance_level(y) == base["chance"] == 0.25
    # the noise layer: CD inside what shuffled labels reach; the separable layer far above it
    assert base["cd"][0] <= base["permutation_high"][0] and base["p_value"][0] > 0.05
    assert base["cd"][1] == 1.0 and base["cd"][1] > base["permutation_high"][1]
    assert base["p_value"][1] == pytest.approx(1 / 201)  # no shuffle reaches it
    # shuffled labels average near chance (the features carry nothing about them)
    assert abs(base["permutation_mean"][0] - 0.25) < 0.08 and abs(base["permutation_mean"][1] - 0.25) < 0.08
    low, high = base["interval"][0]
    assert low <= base["cd"][0] <= high and high - low > 0.05  # 64 points: a wide interval
    assert torch.equal(base["interval"][1], torch.tensor([1.0, 1.0]))
    # the same generator seed gives the same baselines
    again = decodability_baselines(torch.stack([noise, separable]), y, k=10, permutations=200, bootstrap=500)
    assert torch.equal(again["permutation_high"], base["permutation_high"])
    with pytest.raises(ValueError, match="level must lie in"):
        decodability_baselines(noise, y, level=1.5)


def test_chance_is_the_majority_share_for_unbalanced_concepts():
    from lightning_icl.metrics.functional import chance_level

    assert chance_level(torch.tensor([0, 0, 0, 1])) == 0.75
