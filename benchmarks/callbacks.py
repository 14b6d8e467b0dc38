"""Cost of the interpretability callbacks on the quickstart model, measured side by side.

1. Training wall time with all five callbacks at their default cadence vs with none
   (same data, same steps, same validation schedule).
2. Batched ablation of every head (one forward over a replicated batch) vs one forward per head.

    python -m benchmarks.callbacks [--steps 2000] [--val-every 250] [--out benchmarks/results]
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
from lightning_icl.adapters import ICLModuleAdapter
from lightning_icl.interventions import ablation_effects

QUICKSTART_DATA = dict(p=7, num_tasks=4, num_ood_tasks=16, alpha=0.7, num_shots=16, batch_size=64, num_eval_batches=4)
QUICKSTART_MODEL = dict(d_model=64, n_layers=2, n_heads=4, lr=3e-3, warmup_steps=100)


def default_callbacks() -> list[L.Callback]:
    return [ConceptDecodability(), HeadAblation(), HeadAttribution(), AttentionStatistics(), ICLCurves()]


def timed_fit(callbacks: list[L.Callback], steps: int, val_every: int) -> float:
    L.seed_everything(0, verbose=False)
    data = ModularArithmeticDataModule(**QUICKSTART_DATA)
    module = ICLModule(task=data.task_info, **QUICKSTART_MODEL)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, val_check_interval=val_every, check_val_every_n_epoch=None,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks, default_root_dir="/tmp/lightning_icl_bench",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - start


def ablation_speedup(repeats: int) -> tuple[float, float]:
    data = ModularArithmeticDataModule(**QUICKSTART_DATA)
    module = ICLModule(task=data.task_info, **QUICKSTART_MODEL).eval()
    adapter = ICLModuleAdapter(module)
    batch = data.val_dataloader()[0].dataset[0]

    def best(per: int | None) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            ablation_effects(adapter, batch, "zero", heads_per_forward=per)
            times.append(time.perf_counter() - start)
        return min(times)

    best(None)  # warm-up
    return best(None), best(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="the quickstart's length")
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2, help="fits per arm, alternating; the best of each is kept")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    off, on = [], []
    for _ in range(args.repeats):  # alternate the arms so drift hits both
        off.append(timed_fit([], args.steps, args.val_every))
        on.append(timed_fit(default_callbacks(), args.steps, args.val_every))
    batched, per_head = ablation_speedup(repeats=5)
    rows = [
        {"measurement": f"fit, {args.steps} steps, validation every {args.val_every}: no callbacks",
         "seconds": f"{min(off):.2f}", "ratio": "1.000"},
        {"measurement": "same fit, all five callbacks at default cadence",
         "seconds": f"{min(on):.2f}", "ratio": f"{min(on) / min(off):.3f}"},
        {"measurement": "ablate all 8 heads: one forward per head", "seconds": f"{per_head:.4f}", "ratio": "1.000"},
        {"measurement": "ablate all 8 heads: one batched forward",
         "seconds": f"{batched:.4f}", "ratio": f"speed-up {per_head / batched:.2f}x"},
    ]  # fmt: skip
    for row in rows:
        print(row)
    notes = (
        "Quickstart model (d_model 64, 2 layers, 4 heads; p = 7, 16 shots, batch 64) on this machine's CPU. "
        "Default cadence: ConceptDecodability, HeadAblation and ICLCurves at every validation, HeadAttribution "
        "and AttentionStatistics every 50 steps. Best of the alternating repeats per arm."
    )
    for path in write_tables(rows, args.out, "callbacks_cpu", "Callback overhead", notes):
        print("wrote", path)


if __name__ == "__main__":
    main()
