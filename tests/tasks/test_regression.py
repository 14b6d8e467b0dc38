import pytest
import torch

from lightning_icl.tasks import LinearRegressionDataModule, SparseLinearRegressionDataModule
from lightning_icl.tasks.regression import curriculum_value, sparse_bases


def unpack(batch):
    """x [B, K, D] and y [B, K] back out of the interleaved sequence."""
    x = batch.inputs[:, 0::2]
    y_tok = batch.inputs[:, 1::2]
    return x, y_tok[..., 0], y_tok[..., 1:]


def solve_w(x, y):
    return torch.linalg.lstsq(x.double(), y.double().unsqueeze(-1)).solution.squeeze(-1)


def test_sparse_regression_targets_are_w_dot_x_with_w_in_the_basis():
    dm = SparseLinearRegressionDataModule(dim=16, num_bases=4, rank=4, num_shots=20, noise_std=0.0, batch_size=32)
    batch = dm.train_sampler()(torch.Generator().manual_seed(0), 0)
    x, y, rest = unpack(batch)
    assert (rest == 0).all()
    assert torch.equal(batch.targets[batch.mask].view(32, 20), y)
    w = solve_w(x, y)  # K=20 > D=16: exact without noise
    off_basis = w.abs() * (~dm.bases[batch.concept]).double()
    assert off_basis.max() < 1e-6
    assert torch.allclose((x.double() @ w.unsqueeze(-1)).squeeze(-1), y.double(), atol=1e-4)


def test_sparse_regression_noise_has_the_requested_scale():
    dm = SparseLinearRegressionDataModule(dim=8, num_bases=2, rank=4, num_shots=200, noise_std=0.1, batch_size=64)
    batch = dm.train_sampler()(torch.Generator().manual_seed(1), 0)
    x, y, _ = unpack(batch)
    w = solve_w(x, y)
    residual = y.double() - (x.double() @ w.unsqueeze(-1)).squeeze(-1)
    assert 0.08 < residual.std() < 0.12


def test_bases_are_disjoint_or_distinct_overlapping():
    disjoint = sparse_bases(16, 4, 4, False, torch.Generator().manual_seed(0))
    assert (disjoint.sum(0) == 1).all() and (disjoint.sum(1) == 4).all()
    overlapping = sparse_bases(16, 8, 4, True, torch.Generator().manual_seed(0))
    assert (overlapping.sum(1) == 4).all()
    assert len({tuple(row.tolist()) for row in overlapping}) == 8


def test_concepts_are_balanced_in_expectation():
    dm = SparseLinearRegressionDataModule(batch_size=4000)
    counts = torch.bincount(dm.train_sampler()(torch.Generator().manual_seed(0), 0).concept, minlength=4)
    assert (counts > 850).all()


def test_linear_regression_curriculum():
    assert curriculum_value(5, 20, 1, 2000, 0) == 5
    assert curriculum_value(5, 20, 1, 2000, 3999) == 6
    assert curriculum_value(5, 20, 1, 2000, 10**6) == 20
    dm = LinearRegressionDataModule(dim=20, num_points=41, batch_size=16)
    sampler = dm.train_sampler()
    for step, dims, points in [(0, 5, 11), (2000, 6, 13), (30000, 20, 41), (10**6, 20, 41)]:
        batch = sampler(torch.Generator().manual_seed(step), step)
        x, y, _ = unpack(batch)
        assert x.shape == (16, points, 20)
        assert (x[..., dims:] == 0).all() and (x[..., :dims] != 0).all()
        w = solve_w(x[..., :dims], y)  # noiseless, points > dims
        assert torch.allclose((x[..., :dims].double() @ w.unsqueeze(-1)).squeeze(-1), y.double(), atol=1e-4)
        assert (batch.concept < dims).all()
    full = dm.eval_samplers()["full"](torch.Generator().manual_seed(0), 0)
    assert full.inputs.shape == (16, 82, 20) and dm.task_info.seq_len == 82


def test_linear_regression_without_curriculum_is_full_size():
    dm = LinearRegressionDataModule(dim=8, num_points=10, curriculum=False, batch_size=4)
    assert dm.train_sampler()(torch.Generator().manual_seed(0), 0).inputs.shape == (4, 20, 8)


@pytest.mark.parametrize(
    "cls, kwargs, argument",
    [
        (SparseLinearRegressionDataModule, dict(num_bases=5), "num_bases \\* rank"),
        (SparseLinearRegressionDataModule, dict(rank=20), "rank=20 is larger than dim"),
        (SparseLinearRegressionDataModule, dict(noise_std=-1.0), "noise_std"),
        (SparseLinearRegressionDataModule, dict(num_shots=0), "num_shots"),
        (LinearRegressionDataModule, dict(dim_start=30), "dim_start=30"),
        (LinearRegressionDataModule, dict(points_start=50), "points_start=50"),
        (LinearRegressionDataModule, dict(curriculum_interval=0), "curriculum_interval"),
    ],
)
def test_bad_arguments_are_named(cls, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        cls(**kwargs)
