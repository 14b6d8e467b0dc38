import pytest
import torch

from lightning_icl.tasks.base import generator_for
from lightning_icl.tasks.modular import (
    ModularArithmeticDataModule,
    is_prime,
    ood_task_set,
    rectangular_task_set,
    split_inputs,
)


def tasks_of(batch, p):
    return batch.concept // p, batch.concept % p


@pytest.mark.parametrize("split", ["train", "id_seen", "id_unseen", "ood_seen", "ood_unseen"])
def test_every_target_is_the_sequences_task(split):
    p = 11
    dm = ModularArithmeticDataModule(p=p, num_tasks=8, num_ood_tasks=16, alpha=0.6, num_shots=10, batch_size=16)
    sampler = dm.train_sampler() if split == "train" else dm.eval_samplers()[split]
    batch = sampler(torch.Generator().manual_seed(3), 0)
    a, b = tasks_of(batch, p)
    # rebuild the token stream: inputs plus the final target
    tokens = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1).view(16, 10, 3)
    x, y, z = tokens.unbind(-1)
    assert torch.equal(z, (a[:, None] * x + b[:, None] * y) % p)
    # scored positions are exactly the z targets, with their shot index
    assert torch.equal(batch.targets[batch.mask].view(16, 10), z)
    assert torch.equal(batch.shot[batch.mask].view(16, 10), torch.arange(10).expand(16, 10))
    assert (batch.shot[~batch.mask] == -1).all()
    assert batch.split == split
    # x/y pairs come from the split's side of the alpha split
    pool = dm.train_pairs if split in ("train", "id_seen", "ood_seen") else dm.test_pairs
    codes = set((pool[:, 0] * p + pool[:, 1]).tolist())
    assert set((x * p + y).flatten().tolist()) <= codes
    tasks = dm.id_tasks if split in ("train", "id_seen", "id_unseen") else dm.ood_tasks
    assert set(batch.concept.tolist()) <= set((tasks[:, 0] * p + tasks[:, 1]).tolist())


def test_rectangular_rule_gives_distinct_rectangles():
    tasks = rectangular_task_set(29, 64, generator_for(0, "t"))
    assert tasks.shape == (64, 2)
    assert len({tuple(t) for t in tasks.tolist()}) == 64
    for a, b, c, d in tasks.view(16, 4, 2).tolist():
        # (a,b), (a,y), (x,b), (x,y)
        assert a[0] == b[0] and c[0] == d[0] and a[1] == c[1] and b[1] == d[1]
        assert c[0] not in (a[0], a[1]) and b[1] not in (a[0], a[1], c[0])


def test_ood_tasks_are_disjoint_from_pretraining_tasks():
    p = 13
    id_tasks = rectangular_task_set(p, 40, generator_for(1, "t"))
    ood = ood_task_set(p, id_tasks, 1000, generator_for(1, "o"))
    id_codes = set((id_tasks[:, 0] * p + id_tasks[:, 1]).tolist())
    ood_codes = set((ood[:, 0] * p + ood[:, 1]).tolist())
    assert not id_codes & ood_codes
    assert len(id_codes | ood_codes) == p * p  # all the rest, when not capped
    assert ood_task_set(p, id_tasks, 5, generator_for(1, "o")).shape == (5, 2)


def test_alpha_split_is_disjoint_and_complete():
    train, test = split_inputs(11, 0.6, generator_for(0, "a"))
    assert train.shape[0] == round(0.6 * 121) and train.shape[0] + test.shape[0] == 121
    assert not set(map(tuple, train.tolist())) & set(map(tuple, test.tolist()))


def test_balanced_batches_hold_each_task_equally():
    dm = ModularArithmeticDataModule(p=7, num_tasks=4, batch_size=12, num_shots=4)
    batch = dm.train_sampler()(torch.Generator().manual_seed(0), 0)
    counts = torch.bincount(batch.concept, minlength=49)
    assert sorted(counts[counts > 0].tolist()) == [3, 3, 3, 3]


def test_task_info_matches_batches(modular_data):
    info = modular_data.task_info
    batch = modular_data.train_sampler()(torch.Generator().manual_seed(0), 0)
    assert info.seq_len == batch.inputs.shape[1] == 3 * 8 - 1
    assert info.vocab_size == 7 and int(batch.inputs.max()) < 7
    assert info.eval_splits == ["id_seen", "id_unseen", "ood_seen", "ood_unseen"]
    assert batch.scored_positions().shape == (16, 8)


def test_empty_splits_are_dropped():
    dm = ModularArithmeticDataModule(p=5, num_tasks=4, alpha=1.0, batch_size=4)
    assert list(dm.eval_samplers()) == ["id_seen", "ood_seen"]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(p=9), "p must be a prime"),
        (dict(p=5, num_tasks=28), "num_tasks=28 is larger than the task space"),
        (dict(p=7, num_tasks=6, batch_size=12), "multiple of 4"),
        (dict(p=7, num_tasks=8, batch_size=12), "batch_size=12 must be a multiple of num_tasks=8"),
        (dict(p=7, num_tasks=4, batch_size=8, alpha=0.0), "alpha must lie"),
        (dict(p=7, num_tasks=4, batch_size=8, task_rule="grid"), "task_rule"),
        (dict(p=7, num_tasks=4, batch_size=0), "batch_size"),
        (dict(p=7, num_tasks=4, batch_size=8, eval_batch_size=0), "eval_batch_size"),
        (dict(p=7, num_tasks=4, batch_size=8, num_eval_batches=0), "num_eval_batches"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        ModularArithmeticDataModule(**kwargs)


def test_is_prime():
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]


def test_random_rule_and_unbalanced_batches():
    dm = ModularArithmeticDataModule(p=7, num_tasks=5, task_rule="random", balanced=False, batch_size=7)
    assert len({tuple(t) for t in dm.id_tasks.tolist()}) == 5
    batch = dm.train_sampler()(torch.Generator().manual_seed(0), 0)
    assert len(batch) == 7
