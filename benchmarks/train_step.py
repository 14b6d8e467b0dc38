"""Training steps per second and model FLOPs utilisation: the fast path against the plain one.

The He et al. depth-2 paper configuration (d 512, 4 heads, p = 29, 32 shots so T = 95, batch 1024)
trained through a real ``Trainer.fit``, one arm after another in one process, each arm adding one
switch to the one before:

1. plain: batches drawn on the host (two dataloader workers, copied to the device every step),
   eager, the multi-tensor AdamW, fp32;
2. + on-device sampling (``sample_on_device``);
3. + fused AdamW (``OptimizerConfig.fused``);
4. + bf16 autocast (``precision="bf16-mixed"``);
5. + ``torch.compile`` (``compile="default"``);
6. + CUDA graphs (``compile="reduce-overhead"``).

Each arm runs ``--warmup`` steps (compilation, autotuning, CUDA-graph capture) before
``--steps`` timed ones; the table gives ms per step, steps/s, the speed-up over the plain arm,
model TFLOP/s and the utilisation against the dense matmul rate measured in the same run (bf16 on
CUDA, fp32 on the CPU) and, on a GPU whose datasheet peak is known, against that peak (MFU).
Model FLOPs follow the usual convention (PaLM's): 6 per parameter per token for the matrices plus
12·L·T·d per token for attention scores and values over the whole T × T square (causal masking not
discounted); embedding lookups, norms and the loss are not counted. ``training_flops`` is checked
against ``torch.utils.flop_counter`` in the tests.

    python -m benchmarks.train_step [--size paper|small] [--steps 50] [--warmup 15] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import lightning as L
import torch

from benchmarks.common import write_tables
from lightning_icl import ICLModule, ModularArithmeticDataModule, OptimizerConfig, TransformerConfig

SIZES = {
    # the He et al. depth-2 run (configs/he2024_modular_depth2.yaml)
    "paper": (
        dict(p=29, num_tasks=512, num_ood_tasks=256, alpha=0.6, num_shots=32, batch_size=1024),
        TransformerConfig(d_model=512, n_layers=2, n_heads=4),
    ),
    # the CPU sweep's model (configs/he2024_sweep_cpu.yaml)
    "small": (
        dict(p=7, num_tasks=32, num_ood_tasks=16, alpha=0.5, num_shots=16, batch_size=64),
        TransformerConfig(d_model=64, n_layers=2, n_heads=4),
    ),
}

ARMS = [
    # name, sample_on_device, fused, precision, compile
    ("plain", False, False, "32-true", "off"),
    ("+ on-device sampling", True, False, "32-true", "off"),
    ("+ fused AdamW", True, True, "32-true", "off"),
    ("+ bf16 autocast", True, True, "bf16-mixed", "off"),
    ("+ torch.compile", True, True, "bf16-mixed", "default"),
    ("+ CUDA graphs", True, True, "bf16-mixed", "reduce-overhead"),
]

DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak of the datasheet (no sparsity), by a name the GPU's name contains."""


def training_flops(config: TransformerConfig, batch_size: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward and backward, 3x the forward's matmuls) of an
    ``ICLTransformer`` with ``config`` (its ``vocab_size`` or ``input_dim`` set) on ``[batch_size,
    seq_len]`` inputs: the linear layers and the unembedding (or read-in and read-out), plus the
    attention scores and weighted values over the full ``seq_len x seq_len`` square."""
    d, t = config.d_model, seq_len
    per_layer = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * config.mlp_width + 2 * 2 * t * d
    # the unembedding (token tasks), or the read-in and read-out (vector tasks)
    ends = 2 * d * config.vocab_size if config.vocab_size else 2 * config.input_dim * d + 2 * d * config.output_dim
    return 3.0 * batch_size * t * (config.n_layers * per_layer + ends)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_tflops(device: str, seconds: float = 1.0) -> tuple[float, str]:
    """The dense matmul rate this device reaches (bf16 on CUDA, fp32 on the CPU), TFLOP/s."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(5):
            a @ b
        reps += 5
        sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12, f"{str(dtype).removeprefix('torch.')} {n}x{n}"


class StepTimer(L.Callback):
    """Wall time of the training steps after the first ``warmup`` (synchronised at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.steps += 1
            if trainer.global_step == trainer.max_steps:
                sync()
                self.end = time.perf_counter()


def run_arm(size: str, arm: tuple, steps: int, warmup: int, accelerator: str, workers: int) -> dict:
    name, on_device, fused, precision, compile_mode = arm
    data_kwargs, config = SIZES[size]
    L.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(
        **data_kwargs, sample_on_device=on_device, num_workers=0 if on_device else workers
    )
    optimizer = OptimizerConfig(lr=1.5e-4, weight_decay=2.0, schedule="constant", fused=fused)
    module = ICLModule(data.task_info, config, optimizer, compile=compile_mode)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=warmup + steps, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[timer], default_root_dir="/tmp/lightning_icl_bench",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, data)
    total = time.perf_counter() - start
    seconds = (timer.end - timer.start) / timer.steps
    return {"arm": name, "ms/step": seconds * 1e3, "fit s": total, "steps": timer.steps}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default=None, help="paper on CUDA, small on the CPU")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps first (compile, graphs)")
    parser.add_argument(
        "--arms", default=None, help="comma-separated arm numbers (1-6) to run; default: all that apply"
    )
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers of the host-sampling arm")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    accelerator, device = ("gpu", "cuda") if cuda else ("cpu", "cpu")
    size = args.size or ("paper" if cuda else "small")
    arms = (
        ARMS
        if cuda
        else [a for a in ARMS if a[4] != "reduce-overhead" and a[3] == "32-true"]
        + [("+ torch.compile", True, True, "32-true", "default")]
    )  # on the CPU: no CUDA graphs, and bf16 autocast is not a speed-up there
    if args.arms:
        chosen = {int(i) for i in args.arms.split(",")}
        arms = [a for i, a in enumerate(arms, 1) if i in chosen]
    data_kwargs, config = SIZES[size]
    seq_len = 3 * data_kwargs["num_shots"] - 1
    flops = training_flops(dataclasses.replace(config, vocab_size=data_kwargs["p"]), data_kwargs["batch_size"], seq_len)
    ceiling, ceiling_kind = matmul_tflops(device)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in DATASHEET_TFLOPS.items() if k in gpu), None)
    rows, plain = [], None
    for arm in arms:
        try:
            row = run_arm(size, arm, args.steps, args.warmup, accelerator, args.workers)
        except Exception as err:
            print(f"{arm[0]}: failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
            continue
        seconds = row["ms/step"] / 1e3
        plain = plain or seconds
        tflops = flops / seconds / 1e12
        rows.append(
            {
                "arm": row["arm"],
                "ms/step": f"{row['ms/step']:.2f}",
                "steps/s": f"{1 / seconds:.1f}",
                "vs plain": f"{plain / seconds:.2f}x",
                "model TFLOP/s": f"{tflops:.3g}",
                "of measured matmul": f"{tflops / ceiling:.1%}",
                "MFU (datasheet)": f"{tflops / peak:.1%}" if peak else "n/a",
                "fit s (with warm-up)": f"{row['fit s']:.1f}",
            }
        )
        print(rows[-1], flush=True)
    if not rows:
        raise SystemExit("no arm ran")
    stem = f"train_step_{gpu.replace(' ', '_')}" if cuda else "train_step_cpu"
    notes = (
        f"Setup `{size}`: {data_kwargs}, {config.n_layers} blocks of width {config.d_model}, {config.n_heads} heads, "
        f"T = {seq_len}. Model FLOPs per step {flops / 1e12:.3f} TFLOP (6 per matrix parameter per token plus "
        f"12·L·T·d for attention over the full square). Measured dense matmul in this run: {ceiling:.3g} TFLOP/s "
        f"({ceiling_kind})" + (f"; datasheet dense bf16 peak {peak:.0f} TFLOP/s." if peak else ".") + " "
        f"{args.warmup} untimed steps then {args.steps} timed ones per arm, each arm a fresh `Trainer.fit` in "
        "this process; each arm adds its switch to the previous arm's."
    )
    _, md = write_tables(rows, args.out, stem, "Training step: the fast path against the plain one", notes)
    print(f"wrote {md}")
    return rows


if __name__ == "__main__":
    main()
