"""CircuitOverlap on a model whose task families are routed through chosen heads by construction."""

import itertools
import json
from dataclasses import replace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from conftest import tiny_modular, trainer_kwargs
from lightning_icl import CircuitOverlap, ICLModule, OptimizerConfig, TransformerConfig
from lightning_icl.adapters import Adapter, ICLModuleAdapter
from lightning_icl.callbacks.circuits import jaccard, top_heads


class Alternating(IterableDataset):
    def __init__(self, streams):
        self.streams = streams

    def __iter__(self):
        iters = {name: iter(loader) for name, loader in self.streams.items()}
        for name in itertools.cycle(iters):
            yield replace(next(iters[name]), split=f"{name}/train")


class TwoFamilies(L.LightningDataModule):
    """Two modular-arithmetic task groups; batches say their family in ``split`` ("a/...", "b/...")."""

    def __init__(self):
        super().__init__()
        self.families = {"a": tiny_modular(seed=0), "b": tiny_modular(seed=1)}
        self.task_info = replace(self.families["a"].task_info, eval_splits=["a/id_seen", "b/id_seen"])

    def train_dataloader(self):
        return DataLoader(Alternating({n: d.train_dataloader() for n, d in self.families.items()}), batch_size=None)

    def val_dataloader(self):
        return [
            DataLoader([replace(b, split=f"{n}/id_seen") for b in d.val_dataloader()[0]], batch_size=None)
            for n, d in self.families.items()
        ]


TINY = TransformerConfig(d_model=32, n_layers=2, n_heads=2)
FAST = OptimizerConfig(lr=3e-3, warmup_steps=10)


class FamilyGated(ICLModule):
    """Each family's batches run with only its own heads switched on, in training and after."""

    def __init__(self, on: dict[str, list[tuple[int, int]]], **kwargs):
        super().__init__(**kwargs)
        for name, heads in on.items():
            gates = torch.zeros(self.model.n_layers, self.model.n_heads)
            for layer, head in heads:
                gates[layer, head] = 1.0
            self.register_buffer(f"gates_{name}", gates)

    def forward(self, batch, capture=None, head_gates=None, **kwargs):
        fixed = getattr(self, f"gates_{batch.split.split('/')[0]}")
        gates = fixed if head_gates is None else head_gates * fixed
        return super().forward(batch, capture=capture, head_gates=gates, **kwargs)

    def icl_adapter(self):
        adapter = ICLModuleAdapter(self)
        # the shared ablation pass calls the model directly; go through forward() so the family gates apply
        adapter.score_variants = lambda *a, **kw: Adapter.score_variants(adapter, *a, **kw)
        return adapter


@pytest.mark.slow
@pytest.mark.parametrize("score", ["ablation", "attribution"])
def test_families_on_disjoint_heads_do_not_overlap_and_a_shared_route_is_shared(tmp_path, score):
    data = TwoFamilies()
    L.seed_everything(0)
    # family a uses heads L0H0 and L1H0 only, b uses L0H1 and L1H1: disjoint by construction
    on = {"a": [(0, 0), (1, 0)], "b": [(0, 1), (1, 1)]}
    module = FamilyGated(on, task=data.task_info, transformer=TINY, optimizer=FAST)
    overlap = CircuitOverlap(top_fraction=0.5, score=score, mode="zero")
    kwargs = trainer_kwargs(tmp_path, max_steps=20, val_check_interval=20, logger=False, callbacks=[overlap])
    L.Trainer(**kwargs).fit(module, data)
    record = overlap.history[-1]
    assert record["families"] == ["a", "b"]  # found from the splits' "<family>/" prefix
    for name, heads in on.items():
        assert sorted(map(tuple, record["top_heads"][name])) == sorted(heads)
        effects = torch.tensor(record["effects"][name])
        for layer, head in itertools.product(range(2), range(2)):
            if (layer, head) not in heads:  # a head the family never uses has no effect on it
                assert effects[layer, head].abs().item() < 1e-6
    assert record["jaccard"] == [[1.0, 0.0], [0.0, 1.0]]
    assert record["shared_over_union"] == 0.0 and record["shared_heads"] == []
    lines = (tmp_path / "circuits.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["jaccard"][0][1] == 0.0
    assert (tmp_path / "figures" / "circuits.png").exists()


@pytest.mark.slow
def test_a_head_every_family_uses_is_in_every_circuit(tmp_path):
    data = TwoFamilies()
    L.seed_everything(0)
    # both families route through L1H0; each has its own layer-0 head
    on = {"a": [(0, 0), (1, 0)], "b": [(0, 1), (1, 0)]}
    module = FamilyGated(on, task=data.task_info, transformer=TINY, optimizer=FAST)
    overlap = CircuitOverlap(families={"a": 0, "b": 1}, top_fraction=0.5, mode="zero")
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=20, val_check_interval=20, logger=False, callbacks=[overlap])).fit(
        module, data
    )
    record = overlap.history[-1]
    assert [1, 0] in record["shared_heads"]
    assert record["jaccard"][0][1] == pytest.approx(1 / 3)
    assert record["shared_over_union"] == pytest.approx(1 / 3)


def test_head_sets_and_jaccard():
    effect = torch.tensor([[0.5, -1.0, 0.2], [3.0, 0.0, 0.1]])
    assert top_heads(effect, 1 / 6) == {(1, 0)}
    assert top_heads(effect, 0.5) == {(1, 0), (0, 1), (0, 0)}  # by magnitude
    assert top_heads(effect, 0.01) == {(1, 0)}  # at least one head
    assert jaccard({(0, 0), (1, 1)}, {(1, 1), (2, 2)}) == pytest.approx(1 / 3)
    assert jaccard(set(), set()) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_fraction=0.0), "top_fraction"),
        (dict(score="gradient"), "score must be"),
        (dict(mode="noise"), "mode must be"),
        (dict(families={"a": 0}), "at least two"),
        (dict(families={"a": 0, "b": -1}), r"families\['b'\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CircuitOverlap(**kwargs)


def test_one_family_is_a_clear_error(tmp_path):
    from conftest import tiny_module

    data = tiny_modular()
    overlap = CircuitOverlap()  # He et al.'s splits carry no family prefix
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=10, logger=False, callbacks=[overlap]))
    with pytest.raises(ValueError, match="at least two task families"):
        trainer.fit(tiny_module(data), data)


@pytest.mark.slow
def test_families_of_a_multi_family_datamodule_are_found(tmp_path):
    from conftest import tiny_module
    from lightning_icl import BitwiseDataModule, MultiFamilyDataModule

    families = {
        "modular": tiny_modular(batch_size=8),
        "bitwise": BitwiseDataModule(n_bits=3, num_shots=8, batch_size=7, num_eval_batches=2),
    }
    data = MultiFamilyDataModule(families, batch_size=16)
    overlap = CircuitOverlap()
    L.seed_everything(0)
    kwargs = trainer_kwargs(tmp_path, max_steps=10, val_check_interval=10, logger=False, callbacks=[overlap])
    L.Trainer(**kwargs).fit(tiny_module(data), data)
    record = overlap.history[-1]
    assert record["families"] == ["modular", "bitwise"]
    assert len(record["effects"]["bitwise"]) == 2 and len(record["jaccard"]) == 2
