"""The fast training step's switches: on-device sampling, fused AdamW and the compiled forward.

Each switch must leave training what it was: the same batches (on the CPU, bit for bit), the same
losses, every callback's hook still run. The compiler itself is replaced by ``aot_eager`` here (the
tracing, guards and fallbacks are ours to test; inductor's code generation is not, and takes a
minute on two cores); the CUDA test tier compiles for real.
"""

from dataclasses import fields
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import lightning_icl.module as module_mod
from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl import (
    BitwiseDataModule,
    LinearRegressionDataModule,
    ModularArithmeticDataModule,
    MultiFamilyDataModule,
    OptimizerConfig,
    SparseLinearRegressionDataModule,
)
from lightning_icl.module import resolve_compile
from lightning_icl.optim import configure_adamw
from lightning_icl.tasks.base import IndexStream, TrainIndex, TrainStream

BATCH_FIELDS = ("inputs", "targets", "mask", "concept", "shot", "token_class")


def same_batch(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in BATCH_FIELDS)


@pytest.mark.parametrize(
    "data",
    [
        ModularArithmeticDataModule(p=7, num_tasks=4, num_ood_tasks=8, num_shots=3, batch_size=8, balanced=False),
        ModularArithmeticDataModule(p=7, num_tasks=4, num_ood_tasks=8, num_shots=3, batch_size=8),
        BitwiseDataModule(n_bits=3, num_shots=4, batch_size=14),
        SparseLinearRegressionDataModule(dim=8, num_bases=2, rank=2, num_shots=4, batch_size=4),
        LinearRegressionDataModule(dim=5, num_points=13, batch_size=4),
    ],
    ids=["modular", "modular-balanced", "bitwise", "sparse-regression", "linear-regression"],
)
def test_batches_drawn_on_the_device_are_the_host_streams_on_the_cpu(data):
    data.setup("fit")
    for rank in (0, 1):
        host = TrainStream(data.train_sampler(), data.seed, start=0, rank=rank)
        for index, batch in zip(range(4), host, strict=False):
            assert same_batch(batch, data.draw_on("cpu", index, rank))
    assert not same_batch(data.draw_on("cpu", 0, 0), data.draw_on("cpu", 1, 0))  # a stream, not one batch
    data.trainer = SimpleNamespace(global_rank=1)  # the rank comes from the Trainer
    assert same_batch(data.transfer_batch_to_device(TrainIndex(2), torch.device("cpu"), 0), data.draw_on("cpu", 2, 1))
    assert [i.index for _, i in zip(range(3), IndexStream(start=5), strict=False)] == [5, 6, 7]  # resumes at its step


def losses_of_fit(tmp_path, data, module, callbacks=(), **overrides) -> list[float]:
    """Training losses of a fit of ``module`` (built from a fresh seed when given as keyword overrides)."""
    losses = []
    if isinstance(module, dict):
        L.seed_everything(0, verbose=False)
        module = tiny_module(tiny_modular(), **module)

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.seed_everything(0, verbose=False)
    kwargs = trainer_kwargs(tmp_path, max_steps=12, logger=False, enable_checkpointing=False, limit_val_batches=0)
    kwargs.update(overrides)
    L.Trainer(**kwargs, callbacks=[Losses(), *callbacks]).fit(module, data)
    return losses


def test_a_fit_sampling_on_the_device_trains_on_the_same_batches(tmp_path):
    host = losses_of_fit(tmp_path, tiny_modular(sample_on_device=False), {})
    data = tiny_modular(sample_on_device=True)
    seen = []

    class Batches(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(type(batch).__name__)

    on_device = losses_of_fit(tmp_path, data, {}, [Batches()])
    assert on_device == host and len(host) == 12
    assert set(seen) == {"ICLBatch"}  # the index became a batch before the step
    assert tiny_modular().samples_on_device() is False  # None: on for CUDA only (no trainer here: off)


def test_bad_sampling_arguments_are_named():
    with pytest.raises(ValueError, match="sample_on_device"):
        tiny_modular(sample_on_device="yes")
    with pytest.raises(ValueError, match="num_workers=2"):
        tiny_modular(sample_on_device=True, num_workers=2)
    families = {"m": tiny_modular(), "b": BitwiseDataModule(n_bits=3, batch_size=14)}
    with pytest.raises(ValueError, match="MultiFamilyDataModule draws its batches on the host"):
        MultiFamilyDataModule(families, sample_on_device=True)


def test_fused_adamw_is_a_switch_that_trains_the_same(tmp_path):
    with pytest.raises(ValueError, match="fused"):
        OptimizerConfig(fused="yes")
    assert "fused" in {f.name for f in fields(OptimizerConfig)}
    model = torch.nn.Linear(3, 3)
    auto = configure_adamw(model, OptimizerConfig(), 10)["optimizer"]
    assert auto.defaults["fused"] is False  # None: fused only when every parameter is on CUDA
    assert configure_adamw(model, OptimizerConfig(fused=True), 10)["optimizer"].defaults["fused"] is True
    plain = losses_of_fit(tmp_path, tiny_modular(), dict(fused=False))
    fused = losses_of_fit(tmp_path, tiny_modular(), dict(fused=True))
    assert fused == pytest.approx(plain, rel=1e-5, abs=1e-6)


@pytest.fixture
def counted_compile(monkeypatch):
    """``torch.compile`` as ``aot_eager``, counting the compiled model's calls."""
    calls = {"compiled": 0, "compiles": 0}
    real = torch.compile

    def fake(model, mode=None, dynamic=None):
        calls["compiles"] += 1
        calls["mode"] = mode
        compiled = real(model, backend="aot_eager", dynamic=dynamic)

        def run(*args):
            calls["compiled"] += 1
            return compiled(*args)

        return run

    monkeypatch.setattr(module_mod.torch, "compile", fake)
    return calls


def test_the_compiled_forward_trains_as_the_eager_one(tmp_path, counted_compile):
    eager = losses_of_fit(tmp_path, tiny_modular(), dict(compile="off"))
    assert counted_compile["compiles"] == 0
    L.seed_everything(0, verbose=False)
    module = tiny_module(tiny_modular(), compile="default")
    compiled = losses_of_fit(tmp_path, tiny_modular(), module, limit_val_batches=2, val_check_interval=4)
    assert counted_compile == {"compiled": 12, "compiles": 1, "mode": "default"}  # every step; validation eager
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert "_compiled" not in "".join(module.state_dict())  # checkpoints hold the model only


def test_a_step_with_a_hook_on_the_model_runs_eager_so_the_hook_runs(tmp_path, counted_compile):
    fired = []

    class HookOnStep3(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                self.handle = pl_module.model.blocks[0].attn.hook_z.add_hook(lambda z: fired.append(z.shape))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                self.handle.remove()

    losses_of_fit(tmp_path, tiny_modular(), dict(compile="default"), [HookOnStep3()])
    assert len(fired) == 1 and counted_compile["compiled"] == 11  # step 3 eager, with its hook


def test_a_compiler_failure_warns_once_and_trains_eager(tmp_path, monkeypatch):
    def broken(model, mode=None, dynamic=None):
        def run(*args):
            raise RuntimeError("backend exploded\nsecond line")

        return run

    monkeypatch.setattr(module_mod.torch, "compile", broken)
    eager = losses_of_fit(tmp_path, tiny_modular(), dict(compile="off"))
    with pytest.warns(UserWarning, match=r"torch.compile\(mode='default'\) failed \(RuntimeError: backend exploded\)"):
        losses = losses_of_fit(tmp_path, tiny_modular(), dict(compile="default"))
    assert losses == pytest.approx(eager, rel=1e-6)


def test_compile_modes_resolve_and_a_bad_one_is_named():
    assert resolve_compile("auto", torch.device("cpu")) == "off"
    assert resolve_compile("auto", torch.device("cuda", 0)) == "default"
    assert resolve_compile("reduce-overhead", torch.device("cpu")) == "reduce-overhead"
    with pytest.raises(ValueError, match="compile"):
        tiny_module(tiny_modular(), compile="fast")


def test_training_flops_match_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.train_step import training_flops

    data = tiny_modular()
    module = tiny_module(data, d_model=32, n_layers=2, n_heads=2)
    batch = data.draw_on("cpu", 0)
    b, t = batch.inputs.shape
    with FlopCounterMode(display=False) as counter:  # the linear layers (our attention op is not counted)
        outputs, _ = module(batch)
        module.per_position_loss(outputs, batch)[0].mean().backward()
    linear = counter.get_total_flops()
    q, k, v = (torch.randn(b, 2, t, 16, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:  # attention of one layer as matmuls over the full square
        (torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v).sum().backward()
    attention = counter.get_total_flops()
    assert attention == 12 * b * 2 * t * t * 16  # forward 2 matmuls, backward 4
    assert training_flops(module.model.config, b, t) == pytest.approx(linear + 2 * attention, rel=1e-9)
