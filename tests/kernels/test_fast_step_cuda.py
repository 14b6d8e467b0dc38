"""The fast training step on CUDA (the GPU tier): batches drawn on the GPU are valid He et al.
sequences, and the compiled forward (inductor, and CUDA graphs) trains as the eager one does,
with a callback's hooks still run."""

import warnings

import lightning as L
import pytest
import torch

from lightning_icl import AttentionStatistics, ICLModule, ModularArithmeticDataModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def data(**overrides):
    kwargs = dict(p=29, num_tasks=16, num_ood_tasks=16, alpha=0.6, num_shots=8, batch_size=64, num_eval_batches=1)
    kwargs.update(overrides)
    return ModularArithmeticDataModule(**kwargs)


def test_batches_drawn_on_the_gpu_are_he_sequences_and_a_pure_function_of_the_index():
    dm = data()
    a = dm.draw_on("cuda", 3)
    assert a.inputs.is_cuda and a.inputs.shape == (64, 23)
    assert torch.equal(a.inputs, dm.draw_on("cuda", 3).inputs)  # the same index: the same batch
    assert not torch.equal(a.inputs, dm.draw_on("cuda", 4).inputs)
    tokens = torch.cat([a.inputs, a.targets[:, -1:]], dim=1).view(64, 8, 3)  # x y z per shot
    x, y, z = tokens.unbind(-1)
    task_a, task_b = a.concept // 29, a.concept % 29
    assert torch.equal(z, (task_a[:, None] * x + task_b[:, None] * y) % 29)
    assert torch.bincount(a.concept).max() == torch.bincount(a.concept)[a.concept].min() == 4  # balanced
    pairs = set((dm.train_pairs[:, 0] * 29 + dm.train_pairs[:, 1]).tolist())
    assert set((x * 29 + y).flatten().tolist()) <= pairs  # training inputs only


def losses(compile_mode, callbacks=(), steps=25):
    seen, compiled = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(outputs["loss"]))
            compiled.append(pl_module.compiled_model() is not None)

    L.seed_everything(0, verbose=False)
    dm = data()
    module = ICLModule.from_kwargs(dm.task_info, d_model=128, n_layers=2, n_heads=4, lr=1e-3, compile=compile_mode)
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Record(), *callbacks],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, dm)
    failed = [str(w.message) for w in caught if "torch.compile" in str(w.message) and "failed" in str(w.message)]
    return seen, compiled, failed


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_the_compiled_step_trains_as_the_eager_one(mode):
    eager, _, _ = losses("off")
    fast, compiled, failed = losses(mode)
    assert not failed and all(compiled)  # really compiled, no fallback
    assert fast == pytest.approx(eager, rel=0.03, abs=0.02)  # bf16: summation order differs
    assert fast[-1] < fast[0]


def test_a_callback_capturing_in_training_steps_runs_eager_on_those_steps():
    stats = AttentionStatistics(every_n_steps=10)  # a capture argument on steps 10 and 20: those run eager
    _, compiled, failed = losses("default", [stats], steps=20)
    assert not failed and all(compiled) and [r["step"] for r in stats.history] == [10, 20]
    assert all(v > 0 for row in stats.history[-1]["entropy"] for v in row)  # the kernel's statistics, measured
