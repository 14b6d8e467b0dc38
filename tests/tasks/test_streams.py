"""Determinism of the batch streams: seeds, workers, ranks, resumption."""

import itertools

import torch
from torch.utils.data import DataLoader

from lightning_icl.tasks import (
    LinearRegressionDataModule,
    ModularArithmeticDataModule,
    SparseLinearRegressionDataModule,
)
from lightning_icl.tasks.base import FixedBatches, TrainStream


def first(loader, n):
    return list(itertools.islice(iter(loader), n))


def same(a, b):
    return torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and torch.equal(a.concept, b.concept)


def test_same_seed_same_batches_other_seed_other_batches():
    for cls in (ModularArithmeticDataModule, SparseLinearRegressionDataModule, LinearRegressionDataModule):
        kw = dict(batch_size=8) if cls is not ModularArithmeticDataModule else dict(p=7, num_tasks=4, batch_size=8)
        a = first(DataLoader(TrainStream(cls(seed=1, **kw).train_sampler(), 1), batch_size=None), 3)
        b = first(DataLoader(TrainStream(cls(seed=1, **kw).train_sampler(), 1), batch_size=None), 3)
        c = first(DataLoader(TrainStream(cls(seed=2, **kw).train_sampler(), 2), batch_size=None), 3)
        assert all(same(x, y) for x, y in zip(a, b, strict=True)), cls
        assert not same(a[0], c[0]), cls
        assert not same(a[0], a[1]), cls


def test_stream_is_identical_for_any_number_of_workers():
    dm = ModularArithmeticDataModule(p=7, num_tasks=4, batch_size=8)
    ref = first(DataLoader(TrainStream(dm.train_sampler(), 0), batch_size=None), 6)
    two = first(DataLoader(TrainStream(dm.train_sampler(), 0), batch_size=None, num_workers=2), 6)
    assert all(same(x, y) for x, y in zip(ref, two, strict=True))


def test_ranks_draw_distinct_batches_and_start_resumes_the_stream():
    dm = ModularArithmeticDataModule(p=7, num_tasks=4, batch_size=8)
    r0 = first(DataLoader(TrainStream(dm.train_sampler(), 0, rank=0), batch_size=None), 4)
    r1 = first(DataLoader(TrainStream(dm.train_sampler(), 0, rank=1), batch_size=None), 4)
    assert not any(same(x, y) for x, y in zip(r0, r1, strict=True))
    resumed = first(DataLoader(TrainStream(dm.train_sampler(), 0, start=2, rank=0), batch_size=None), 2)
    assert same(resumed[0], r0[2]) and same(resumed[1], r0[3])


def test_eval_batches_are_fixed_and_differ_between_val_and_test():
    dm = ModularArithmeticDataModule(p=7, num_tasks=4, batch_size=8, num_eval_batches=3)
    val1, val2 = dm.val_dataloader(), dm.val_dataloader()
    test = dm.test_dataloader()
    assert len(val1) == 4 and all(len(loader.dataset) == 3 for loader in val1)
    assert isinstance(val1[0].dataset, FixedBatches)
    assert same(val1[0].dataset[2], val2[0].dataset[2])
    assert not same(val1[0].dataset[0], test[0].dataset[0])
    assert [loader.dataset[0].split for loader in val1] == ["id_seen", "id_unseen", "ood_seen", "ood_unseen"]
