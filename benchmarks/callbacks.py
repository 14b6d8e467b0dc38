"""Cost of the interpretability callbacks on the quickstart model, measured side by side.

1. Training wall time with all five callbacks at their default cadence vs with none
   (same data, same steps, same validation schedule).
2. Ablating every head: one forward per head (by hand) vs the replicated batch in one forward
   vs the shared pass ``ablation_effects`` uses (each head computes only the layers from its own up).

    python -m benchmarks.callbacks [--accelerator cpu|gpu] [--steps 2000] [--val-every 250] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

from benchmarks.common import write_tables
from lightning_icl import (
    AttentionStatistics,
    ConceptDecodability,
    HeadAblation,
    HeadAttribution,
    ICLCurves,
    ICLModule,
    ModularArithmeticDataModule,
)
from lightning_icl.adapters import Adapter, ICLModuleAdapter
from lightning_icl.interventions import ablation_effects

QUICKSTART_DATA = dict(p=7, num_tasks=4, num_ood_tasks=16, alpha=0.7, num_shots=16, batch_size=64, num_eval_batches=4)
QUICKSTART_MODEL = dict(d_model=64, n_layers=2, n_heads=4, lr=3e-3, warmup_steps=100)


def default_callbacks() -> list[L.Callback]:
    return [ConceptDecodability(), HeadAblation(), HeadAttribution(), AttentionStatistics(), ICLCurves()]


def timed_fit(callbacks: list[L.Callback], steps: int, val_every: int, accelerator: str) -> float:
    L.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(**QUICKSTART_DATA)
    module = ICLModule.from_kwargs(task=data.task_info, **QUICKSTART_MODEL)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, val_check_interval=val_every, check_val_every_n_epoch=None,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks, default_root_dir="/tmp/lightning_icl_bench",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, data)
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def forward_per_head(adapter: Adapter, batch) -> torch.Tensor:
    """The baseline: a clean forward, then one full forward per ablated head."""
    clean = adapter.score(adapter.forward(batch)[0], batch).loss.mean()
    effects = torch.zeros(adapter.n_layers, adapter.n_heads)
    for layer in range(adapter.n_layers):
        for head in range(adapter.n_heads):
            gates = torch.ones(adapter.n_layers, adapter.n_heads, device=clean.device)
            gates[layer, head] = 0.0
            effects[layer, head] = adapter.score(adapter.forward(batch, head_gates=gates)[0], batch).loss.mean() - clean
    return effects


@torch.no_grad()
def replicated(adapter: Adapter, batch) -> torch.Tensor:
    """Every head in one forward over the batch replicated once per head (no shared work)."""
    n_l, n_h = adapter.n_layers, adapter.n_heads
    gates = torch.ones(n_l * n_h, n_l, n_h, device=batch.inputs.device)
    gates.view(n_l * n_h, -1)[torch.arange(n_l * n_h), torch.arange(n_l * n_h)] = 0.0
    clean, variants = Adapter.score_variants(adapter, batch, gates)
    return variants.loss.flatten(1).mean(1).view(n_l, n_h) - clean.loss.mean()


def ablation_times(device: torch.device, repeats: int) -> dict[str, float]:
    data = ModularArithmeticDataModule(**QUICKSTART_DATA)
    module = ICLModule.from_kwargs(task=data.task_info, **QUICKSTART_MODEL).eval().to(device)
    adapter = ICLModuleAdapter(module)
    batch = module.transfer_batch_to_device(data.val_dataloader()[0].dataset[0], device, 0)
    methods = {
        "one forward per head": lambda: forward_per_head(adapter, batch),
        "replicated batch, one forward": lambda: replicated(adapter, batch),
        "shared pass (ablation_effects)": lambda: ablation_effects(adapter, batch, "zero").loss_effect,
    }
    reference = forward_per_head(adapter, batch)
    for name, fn in methods.items():  # warm-up, and the three agree
        torch.testing.assert_close(fn().cpu().float(), reference.cpu(), atol=1e-4, rtol=1e-3, msg=name)
    best = {}
    for name, fn in methods.items():
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu", choices=["cpu", "gpu"])
    parser.add_argument("--steps", type=int, default=2000, help="the quickstart's length")
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2, help="fits per arm, alternating; the best of each is kept")
    parser.add_argument("--skip-fit", action="store_true", help="only the ablation comparison")
    parser.add_argument("--breakdown", action="store_true", help="also one fit with each callback alone")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")

    rows = []
    stem = "callbacks_" + (torch.cuda.get_device_name().replace(" ", "_") if device.type == "cuda" else "cpu")
    if args.skip_fit:
        stem += "_ablation"
    where = torch.cuda.get_device_name() if device.type == "cuda" else "this machine's CPU"
    notes = (
        f"Quickstart model (d_model 64, 2 layers, 4 heads; p = 7, 16 shots, batch 64) on {where}. "
        "Default cadence: ConceptDecodability, HeadAblation and ICLCurves at every validation, HeadAttribution "
        "and AttentionStatistics every 50 steps. Best of the alternating repeats per arm; the per-callback rows "
        "(--breakdown) are one fit each. Ablation: zero ablation of each head's effect on the answer loss, best "
        "of 20; the three methods give the same effects (checked in the run)."
    )

    def write() -> None:
        for row in rows:
            print(row)
        for path in write_tables(rows, args.out, stem, "Callback overhead", notes):
            print("wrote", path, flush=True)

    times = ablation_times(device, repeats=20)
    base = times["one forward per head"]
    for name, seconds in times.items():
        ratio = "1.000" if name == "one forward per head" else f"speed-up {base / seconds:.2f}x"
        rows.append({"measurement": f"ablate all 8 heads: {name}", "seconds": f"{seconds:.5f}", "ratio": ratio})
    write()
    if not args.skip_fit:
        off, on = [], []
        for _ in range(args.repeats):  # alternate the arms so drift hits both
            off.append(timed_fit([], args.steps, args.val_every, args.accelerator))
            on.append(timed_fit(default_callbacks(), args.steps, args.val_every, args.accelerator))
        rows += [
            {"measurement": f"fit, {args.steps} steps, validation every {args.val_every}: no callbacks",
             "seconds": f"{min(off):.2f}", "ratio": "1.000"},
            {"measurement": "same fit, all five callbacks at default cadence",
             "seconds": f"{min(on):.2f}", "ratio": f"{min(on) / min(off):.3f}"},
        ]  # fmt: skip
        write()
        if args.breakdown:
            for callback in default_callbacks():
                seconds = timed_fit([callback], args.steps, args.val_every, args.accelerator)
                rows.append({"measurement": f"same fit, {type(callback).__name__} alone",
                             "seconds": f"{seconds:.2f}", "ratio": f"{seconds / min(off):.3f}"})  # fmt: skip
                write()


if __name__ == "__main__":
    main()
