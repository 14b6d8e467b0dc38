"""The tiny ICL model trained with the fused kernel follows the reference's loss curve."""

import os

import pytest
import torch

from lightning_icl import ICLModule, ModularArithmeticDataModule
from lightning_icl.tasks.base import generator_for

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def loss_curve(backend: str, device: str, steps: int) -> list[float]:
    data = ModularArithmeticDataModule(p=7, num_tasks=4, num_shots=8, batch_size=8)
    torch.manual_seed(0)
    module = ICLModule.from_kwargs(
        task=data.task_info, d_model=32, n_layers=2, n_heads=2, attention_backend=backend
    ).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    sampler = data.train_sampler()
    losses = []
    for step in range(steps):
        batch = sampler(generator_for(0, "train", 0, step), step)
        batch.inputs, batch.targets, batch.mask = (x.to(device) for x in (batch.inputs, batch.targets, batch.mask))
        out, _ = module.model(batch.inputs)
        loss = module.per_position_loss(out, batch)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_training_with_the_kernel_matches_the_reference():
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("needs the interpreter or CUDA")
    device = "cpu" if INTERPRETED else "cuda"
    # the interpreter computes fp32 dots exactly; on a GPU the kernel's fp32 dots use TF32
    tolerance = 2e-3 if INTERPRETED else 2e-2
    reference = loss_curve("torch", device, 30)
    kernel = loss_curve("triton", device, 30)
    assert reference[-1] < reference[0] - 0.1  # it does learn
    for step, (a, b) in enumerate(zip(reference, kernel, strict=True)):
        assert abs(a - b) <= tolerance * max(1.0, abs(a)), f"step {step}: reference {a:.5f} vs kernel {b:.5f}"
