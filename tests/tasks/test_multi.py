import itertools
import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl.adapters import ICLModuleAdapter
from lightning_icl.cli import main
from lightning_icl.tasks import BitwiseDataModule, MultiFamilyDataModule, SparseLinearRegressionDataModule
from lightning_icl.tasks.base import TrainStream
from lightning_icl.tasks.bitwise import OPS
from lightning_icl.tasks.multi import row_counts

P = 7  # modular numbers 0..6 (49 concepts); bitwise strings 0..7 (7 concepts)


def bitwise(**overrides) -> BitwiseDataModule:
    return BitwiseDataModule(**{"n_bits": 3, "num_shots": 8, "batch_size": 7, "num_eval_batches": 2, **overrides})


def mixed(**overrides) -> MultiFamilyDataModule:
    families = {"modular": tiny_modular(batch_size=8), "bitwise": bitwise()}
    return MultiFamilyDataModule(**{"families": families, "batch_size": 16, **overrides})


def draw(dm, index=0, seed=0):
    return dm.train_sampler()(torch.Generator().manual_seed(seed), index)


def examples(batch):
    tokens = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    return tokens.view(len(batch), -1, 3).unbind(-1)


def test_rows_carry_their_family_and_a_global_concept_that_matches_their_content():
    dm = mixed()
    assert dm.family_names == ["modular", "bitwise"]
    assert dm.concept_offsets == {"modular": 0, "bitwise": P * P}
    info = dm.task_info
    assert (info.num_concepts, info.vocab_size, info.seq_len) == (P * P + 7, 8, 23)
    batch = draw(dm)
    assert batch.family.tolist() == [0] * 8 + [1] * 8 and batch.split == "train"
    x, y, z = examples(batch)
    modular, bits = batch.family == 0, batch.family == 1
    a, b = batch.concept[modular] // P, batch.concept[modular] % P
    assert torch.equal(z[modular], (a[:, None] * x[modular] + b[:, None] * y[modular]) % P)
    ops = batch.concept[bits] - P * P
    assert ops.min() >= 0 and ops.max() < 7
    for op, x1, x2, out in zip(ops.tolist(), x[bits], y[bits], z[bits], strict=True):
        if OPS[op] == "AND":
            assert torch.equal(out, x1 & x2)
        elif OPS[op] == "XOR":
            assert torch.equal(out, x1 ^ x2)


def test_family_batches_are_used_whole_when_the_share_matches():
    # shares 8 and 7 equal the families' own batch sizes: each block is a balanced family batch
    dm = mixed(batch_size=15, weights={"modular": 8, "bitwise": 7})
    batch = draw(dm)
    counts = torch.bincount(batch.concept)
    assert sorted(counts[counts > 0][:4].tolist()) == [2, 2, 2, 2]  # 4 modular tasks x 2
    assert batch.concept[batch.family == 1].sort().values.tolist() == list(range(P * P, P * P + 7))


def test_weights_set_the_share_of_rows_in_expectation():
    weights = torch.tensor([0.75, 0.25, 0.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    counts = torch.stack([row_counts(weights, 10, gen) for _ in range(4000)])
    assert (counts.sum(1) == 10).all()
    assert set(counts[:, 0].tolist()) == {7, 8} and set(counts[:, 1].tolist()) == {2, 3}
    assert (counts[:, 2] == 0).all()
    assert counts.double().mean(0).tolist() == pytest.approx([7.5, 2.5, 0.0], abs=0.05)
    # through the DataModule: 3:1, and a weight-0 family is evaluated but never trained on
    families = {"a": tiny_modular(batch_size=8), "b": bitwise(), "c": bitwise(seed=1)}
    dm = MultiFamilyDataModule(families, weights={"a": 3, "b": 1, "c": 0}, batch_size=12)
    rows = torch.cat([draw(dm, index=i).family for i in range(20)])
    assert torch.bincount(rows, minlength=3).tolist() == [180, 60, 0]
    assert list(dm.family_loaders()) == ["a", "b", "c"] and dm.family_loaders()["c"] == [5]


def test_disjoint_vocab_shifts_each_family_into_its_own_range():
    shared, disjoint = draw(mixed()), draw(mixed(disjoint_vocab=True))
    assert mixed(disjoint_vocab=True).token_offsets == {"modular": 0, "bitwise": P}
    assert mixed(disjoint_vocab=True).task_info.vocab_size == P + 8
    for batch in (shared, disjoint):
        rows = batch.family == 0
        assert batch.inputs[rows].max() < P
    bits = disjoint.family == 1
    assert disjoint.inputs[bits].min() >= P and disjoint.inputs[bits].max() < P + 8
    assert disjoint.targets[bits].min() >= P
    assert torch.equal(disjoint.inputs[bits] - P, shared.inputs[bits])  # same draws, shifted


def test_validation_has_one_loader_per_family_and_split():
    dm = mixed(disjoint_vocab=True)
    names = ["modular/id_seen", "modular/id_unseen", "modular/ood_seen", "modular/ood_unseen", "bitwise/all"]
    assert dm.task_info.eval_splits == names
    assert dm.family_loaders() == {"modular": [0, 1, 2, 3], "bitwise": [4]}
    loaders = dm.val_dataloader()
    assert len(loaders) == 5 and [len(loader.dataset) for loader in loaders] == [2, 2, 2, 2, 2]
    for i, (name, loader) in enumerate(zip(names, loaders, strict=True)):
        batch = loader.dataset[1]
        family = 0 if i < 4 else 1
        assert batch.split == name and (batch.family == family).all()
    # the same batches as the family's own loader, relabelled
    own = bitwise().val_dataloader()[0].dataset[1]
    ours = loaders[4].dataset[1]
    assert torch.equal(ours.inputs, own.inputs + P) and torch.equal(ours.concept, own.concept + P * P)
    assert not torch.equal(dm.test_dataloader()[4].dataset[1].inputs, ours.inputs)
    assert [len(loader.dataset) for loader in mixed(num_eval_batches=1).val_dataloader()] == [1] * 5


def test_batches_are_a_function_of_seed_rank_and_index():
    def stream(seed, rank=0):
        dm = mixed(seed=seed)
        return list(itertools.islice(DataLoader(TrainStream(dm.train_sampler(), seed, rank=rank), batch_size=None), 2))

    a, b, other_rank, other_seed = stream(1), stream(1), stream(1, rank=1), stream(2)
    assert all(torch.equal(x.inputs, y.inputs) and torch.equal(x.family, y.family) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].inputs, a[1].inputs)
    assert not torch.equal(a[0].inputs, other_rank[0].inputs)
    assert not torch.equal(a[0].inputs, other_seed[0].inputs)


def test_family_travels_with_causal_lm_dicts_and_repeated_batches():
    dm = mixed(batch_format="causal_lm")
    hf = dm.val_dataloader()[4].dataset[0]
    assert (hf["family"] == 1).all() and hf["input_ids"].shape == (len(hf["family"]), 24)
    batch = draw(mixed())
    adapter = ICLModuleAdapter(tiny_module(mixed()))
    tiled = adapter.repeat(batch, 3)
    assert torch.equal(tiled.family, batch.family.repeat(3)) and len(tiled) == 3 * len(batch)
    assert "family" not in draw(bitwise()).as_causal_lm() and adapter.repeat(draw(bitwise()), 2).family is None


@pytest.mark.parametrize(
    "families, kwargs, message",
    [
        ({"modular": "tiny", "bitwise": "short"}, {}, "families 'modular' and 'bitwise' differ in seq_len: 23 vs 11"),
        ({"modular": "tiny", "regression": "vectors"}, {}, "families\\['regression'\\] is a 'vectors' task"),
        ({"modular": "tiny", "bitwise": "hf"}, {}, "families\\['bitwise'\\] must use batch_format='icl'"),
        ({"a/b": "tiny"}, {}, "families: the name 'a/b'"),
        ({}, {}, "families must be a non-empty mapping"),
        ({"modular": "tiny", "bitwise": "bits"}, dict(weights={"modular": 1}), "weights must give one value per"),
        ({"modular": "tiny", "bitwise": "bits"}, dict(weights={"modular": 0, "bitwise": 0}), "not all 0"),
        ({"modular": "tiny", "bitwise": "bits"}, dict(weights={"modular": -1, "bitwise": 1}), ">= 0"),
        ({"modular": "tiny"}, dict(num_eval_batches=0), "num_eval_batches"),
        ({"modular": "tiny"}, dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments_are_named(families, kwargs, message):
    make = {
        "tiny": lambda: tiny_modular(batch_size=8),
        "bits": bitwise,
        "short": lambda: bitwise(num_shots=4),
        "hf": lambda: bitwise(batch_format="causal_lm"),
        "vectors": lambda: SparseLinearRegressionDataModule(dim=8, num_bases=2, rank=4, num_shots=8, batch_size=4),
    }
    with pytest.raises(ValueError, match=message):
        MultiFamilyDataModule({name: make[kind]() for name, kind in families.items()}, **kwargs)


@pytest.mark.slow
def test_one_model_fits_and_logs_metrics_per_family(tmp_path):
    L.seed_everything(0)
    data = mixed()
    module = tiny_module(data, warmup_steps=2)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=4, val_check_interval=4, limit_val_batches=1))
    trainer.fit(module, data)
    for split in data.task_info.eval_splits:
        assert f"val/{split}/acc" in module.last_eval and f"val/{split}/loss_last" in module.last_eval
    assert "val/modular/id_seen/acc" in trainer.callback_metrics and "val/bitwise/all/acc" in trainer.callback_metrics


def test_families_from_the_command_line_and_their_mismatch_named(capsys):
    families = {
        "modular": {"class_path": "ModularArithmeticDataModule", "init_args": {"p": 7, "num_tasks": 4}},
        "bitwise": {"class_path": "BitwiseDataModule", "init_args": {"n_bits": 3, "num_shots": 8}},
    }
    args = ["fit", "--model=ICLModule", "--data=MultiFamilyDataModule", f"--data.families={json.dumps(families)}"]
    with pytest.raises(SystemExit) as exit_:  # the CLI: the package's message as its last line, status 2
        main([*args, "--seed_everything=0", "--trainer.max_steps=1"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "lightning-icl: error: families 'modular' and 'bitwise' differ in seq_len: 95 vs 23"
