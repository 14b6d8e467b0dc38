import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
# this when the package's kernels are first imported, which happens lazily on first use.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep the suite within two CPU cores and quiet.
torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")

from lightning_icl import ICLModule, ModularArithmeticDataModule  # noqa: E402


def tiny_modular(**overrides) -> ModularArithmeticDataModule:
    kwargs = dict(p=7, num_tasks=4, num_ood_tasks=8, alpha=0.7, num_shots=8, batch_size=16, num_eval_batches=2, seed=0)
    kwargs.update(overrides)
    return ModularArithmeticDataModule(**kwargs)


def tiny_module(data, **overrides) -> ICLModule:
    kwargs = dict(task=data.task_info, d_model=32, n_layers=2, n_heads=2, lr=3e-3, warmup_steps=10)
    kwargs.update(overrides)
    return ICLModule.from_kwargs(**kwargs)


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=20,
        val_check_interval=10,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        log_every_n_steps=5,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def modular_data():
    return tiny_modular()
