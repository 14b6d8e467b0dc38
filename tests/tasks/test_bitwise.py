import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_icl.tasks import BitwiseDataModule
from lightning_icl.tasks.base import TrainStream
from lightning_icl.tasks.bitwise import OPS

# the gates bit by bit, on plain ints
GATES = {
    "AND": lambda a, b: a & b,
    "NAND": lambda a, b: 1 - (a & b),
    "OR": lambda a, b: a | b,
    "NOR": lambda a, b: 1 - (a | b),
    "XOR": lambda a, b: a ^ b,
    "XNOR": lambda a, b: 1 - (a ^ b),
}


def reference(op: str, x1: int, x2: int, n_bits: int) -> int:
    bits = [GATES[op]((x1 >> i) & 1, (x2 >> i) & 1) for i in range(n_bits)]
    return sum(bit << i for i, bit in enumerate(bits))


def examples(batch, num_shots):
    """``[B, K]`` x1, x2, y rebuilt from the inputs plus the final target."""
    tokens = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1).view(len(batch), num_shots, 3)
    return tokens.unbind(-1)


def draw(dm, index=0, seed=0, split="train"):
    sampler = dm.train_sampler() if split == "train" else dm.eval_samplers()[split]
    return sampler(torch.Generator().manual_seed(seed), index)


@pytest.mark.parametrize("n_bits", [1, 3, 5])
def test_every_gate_matches_a_bit_by_bit_reference(n_bits):
    dm = BitwiseDataModule(n_bits=n_bits, num_shots=6, batch_size=14)
    batch = draw(dm)
    x1, x2, y = examples(batch, 6)
    assert int(batch.inputs.max()) < 2**n_bits == dm.task_info.vocab_size
    for row in range(len(batch)):
        op = OPS[int(batch.concept[row])]
        if op == "Null":
            continue
        for a, b, out in zip(x1[row].tolist(), x2[row].tolist(), y[row].tolist(), strict=True):
            assert out == reference(op, a, b, n_bits), (op, a, b)
    # scored positions are exactly the answers, with their shot index
    assert torch.equal(batch.targets[batch.mask].view(14, 6), y)
    assert torch.equal(batch.shot[batch.mask].view(14, 6), torch.arange(6).expand(14, 6))
    assert torch.equal(batch.token_class[0], torch.arange(17) % 3)


def test_concept_is_the_index_of_the_op_whichever_ops_are_used():
    dm = BitwiseDataModule(n_bits=3, ops=["XNOR", "AND"], num_shots=4, batch_size=4)
    batch = draw(dm)
    assert sorted(batch.concept.tolist()) == [0, 0, 5, 5]
    x1, x2, y = examples(batch, 4)
    xnor = batch.concept == OPS.index("XNOR")
    assert torch.equal(y[xnor], (x1[xnor] ^ x2[xnor]) ^ 7)
    assert dm.task_info.num_concepts == len(OPS) == 7


def test_null_answers_are_random_whatever_the_inputs():
    # alpha = 1/16 of the 16 pairs: every example shows the same (x1, x2)
    dm = BitwiseDataModule(n_bits=2, ops=["XOR", "Null"], alpha=1 / 16, num_shots=16, batch_size=64)
    batch = draw(dm)
    x1, x2, y = examples(batch, 16)
    assert x1.unique().numel() == 1 and x2.unique().numel() == 1
    null = batch.concept == OPS.index("Null")
    assert y[~null].unique().numel() == 1  # a gate: one answer for one input
    counts = torch.bincount(y[null].flatten(), minlength=4)  # 512 draws of 4 values
    assert counts.min() > 96 and counts.max() < 160


def test_balanced_batches_hold_each_op_equally():
    batch = draw(BitwiseDataModule(n_bits=3, num_shots=4, batch_size=21))
    assert torch.bincount(batch.concept, minlength=7).tolist() == [3] * 7
    unbalanced = draw(BitwiseDataModule(n_bits=3, num_shots=4, batch_size=10, balanced=False))
    assert len(unbalanced) == 10


def test_evaluation_splits_cover_every_op_and_respect_the_input_split():
    dm = BitwiseDataModule(n_bits=3, num_shots=4, batch_size=7)
    assert dm.task_info.eval_splits == ["all"]
    assert torch.bincount(draw(dm, split="all").concept, minlength=7).tolist() == [1] * 7
    held = BitwiseDataModule(n_bits=3, alpha=0.5, num_shots=4, batch_size=7, eval_batch_size=14)
    assert held.task_info.eval_splits == ["seen", "unseen"]
    codes = lambda pairs: set((pairs[:, 0] * 8 + pairs[:, 1]).tolist())
    assert not codes(held.train_pairs) & codes(held.test_pairs)
    for split, pool in (("seen", held.train_pairs), ("unseen", held.test_pairs)):
        batch = draw(held, index=1, split=split)
        x1, x2, _ = examples(batch, 4)
        assert batch.split == split and set((x1 * 8 + x2).flatten().tolist()) <= codes(pool)
        assert torch.bincount(batch.concept, minlength=7).tolist() == [2] * 7
    x1, x2, _ = examples(draw(held), 4)
    assert set((x1 * 8 + x2).flatten().tolist()) <= codes(held.train_pairs)


def test_batches_are_a_function_of_seed_rank_and_index():
    def stream(seed, rank=0):
        dm = BitwiseDataModule(n_bits=3, num_shots=4, batch_size=14, seed=seed)
        return list(itertools.islice(DataLoader(TrainStream(dm.train_sampler(), seed, rank=rank), batch_size=None), 2))

    a, b, other_rank, other_seed = stream(1), stream(1), stream(1, rank=1), stream(2)
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].inputs, a[1].inputs)
    assert not torch.equal(a[0].inputs, other_rank[0].inputs)
    assert not torch.equal(a[0].inputs, other_seed[0].inputs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_bits=0), "n_bits must be an integer >= 1"),
        (dict(n_bits=11), "n_bits must be <= 10"),
        (dict(ops=["AND", "MAYBE"]), "ops must be a non-empty list of names"),
        (dict(ops="AND"), "ops must be a non-empty list of names"),
        (dict(ops=[]), "ops must be a non-empty list"),
        (dict(ops=["OR", "OR"], batch_size=4), "ops must not repeat"),
        (dict(batch_size=8), "batch_size=8 must be a multiple of len\\(ops\\)=7"),
        (dict(alpha=0.0), "alpha must lie"),
        (dict(n_bits=1, alpha=0.1), "alpha=0.1 leaves no"),
        (dict(num_shots=0), "num_shots"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BitwiseDataModule(**{"batch_size": 7, **kwargs})
