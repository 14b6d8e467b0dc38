"""Throughput of the task samplers against the training step they have to feed.

For each paper setup: sequences/s drawn by the sampler (one process, as one
dataloader worker would), and sequences/s of a forward+backward of that setup's
model on the same machine. The ratio says how many times faster the data comes
than the model can eat it; above 1 the sampler never starves the model.

    python benchmarks/samplers.py [--model-batch 16] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_tables
from lightning_icl import (
    ICLModule,
    LinearRegressionDataModule,
    ModularArithmeticDataModule,
    SparseLinearRegressionDataModule,
)
from lightning_icl.tasks.base import generator_for

SETUPS = {
    # name: (DataModule, data kwargs at paper size, model kwargs at paper size)
    "he2024 modular p=29 n_id=512 (depth 2)": (
        ModularArithmeticDataModule,
        dict(p=29, num_tasks=512, alpha=0.6, num_shots=32, batch_size=1024),
        dict(d_model=512, n_layers=2, n_heads=4),
    ),
    "han2024 sparse regression D=16": (
        SparseLinearRegressionDataModule,
        dict(dim=16, num_bases=4, rank=4, num_shots=20, batch_size=128),
        dict(d_model=256, n_layers=12, n_heads=8, positional="learned", bias=True, activation="gelu"),
    ),
    "garg2022 linear regression d=20 (end of curriculum)": (
        LinearRegressionDataModule,
        dict(dim=20, num_points=41, curriculum=False, batch_size=64),
        dict(d_model=256, n_layers=12, n_heads=8, positional="learned", bias=True, activation="gelu"),
    ),
    "quickstart modular p=7": (
        ModularArithmeticDataModule,
        dict(p=7, num_tasks=4, num_ood_tasks=16, alpha=0.7, num_shots=16, batch_size=64),
        dict(d_model=64, n_layers=2, n_heads=4),
    ),
}


def sampler_rate(data, seconds: float) -> tuple[float, float]:
    """(sequences/s, ms per batch) of the training sampler, drawing fresh seeded batches."""
    sampler = data.train_sampler()
    sampler(generator_for(0, "warmup"), 0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler(generator_for(0, "bench", n), n)
        n += 1
    elapsed = time.perf_counter() - start
    return n * data.batch_size / elapsed, 1000 * elapsed / n


def model_rate(data, model_kwargs: dict, batch: int, steps: int, device: str) -> float:
    """Sequences/s of forward + backward + AdamW step of the setup's model on ``batch`` sequences."""
    module = ICLModule.from_kwargs(task=data.task_info, **model_kwargs).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    sample = data.train_sampler()(generator_for(0, "model"), 0)
    sample.inputs, sample.targets = sample.inputs[:batch].to(device), sample.targets[:batch].to(device)
    sample.mask = sample.mask[:batch].to(device)

    def step():
        out, _ = module.model(sample.inputs)
        loss, _ = module.per_position_loss(out, sample)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent drawing batches per sampler")
    parser.add_argument("--model-batch", type=int, default=16, help="sequences per timed model step")
    parser.add_argument("--model-steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    rows = []
    for name, (cls, data_kwargs, model_kwargs) in SETUPS.items():
        data = cls(**data_kwargs)
        seq_rate, ms = sampler_rate(data, args.seconds)
        train_rate = model_rate(data, model_kwargs, args.model_batch, args.model_steps, args.device)
        rows.append(
            {
                "setup": name,
                "batch": data.batch_size,
                "sampler ms/batch": f"{ms:.2f}",
                "sampler seq/s": f"{seq_rate:,.0f}",
                f"model train seq/s ({args.device})": f"{train_rate:,.1f}",
                "sampler / model": f"{seq_rate / train_rate:,.0f}x",
            }
        )
        print(rows[-1], flush=True)
    stem = f"samplers_{args.device}"
    notes = (
        "Sampler: one process drawing seeded training batches (what one dataloader worker does). "
        f"Model: forward + backward + AdamW step of the setup's model on {args.model_batch} sequences, "
        f"{args.model_steps} timed steps after one warm-up. A ratio above 1 means the sampler outpaces training."
    )
    for path in write_tables(rows, args.out, stem, "Task sampler throughput vs training throughput", notes):
        print("wrote", path)


if __name__ == "__main__":
    main()
