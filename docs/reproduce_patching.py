"""Concept patching and function-vector heads on a trained checkpoint, after training.

    python docs/reproduce_patching.py runs/he_sweep/n32_a0.8/version_0/checkpoints/last.ckpt

Means from 4 held-out batches of the first validation split, patching on 4 others; prints the
last answer's loss per layer (clean, own / other concept's direction added at the final query,
own concept's mean replacing it, zero-shot prompts) and the heads of largest indirect effect.
"""

import sys
import time

import torch

from lightning_icl.adapters import ICLModuleAdapter
from lightning_icl.checkpoints import load_trained
from lightning_icl.interventions.patching import (
    concept_means,
    concept_patching,
    function_vector_effects,
    query_head_means,
)


def main(ckpt: str) -> None:
    start = time.perf_counter()
    module, data = load_trained(ckpt)
    adapter = ICLModuleAdapter(module.eval())
    loader = data.val_dataloader()[0]
    batches = [loader.dataset[i] for i in range(min(8, len(loader.dataset)))]
    half = len(batches) // 2
    means = concept_means(adapter, batches[:half])
    totals: dict[str, dict[str, torch.Tensor]] = {"shift": {}, "replace": {}}
    count = 0
    for batch in batches[half:]:
        for method in totals:
            r = concept_patching(adapter, batch, means, method)
            for key, value in r.loss.items():
                totals[method][key] = totals[method].get(key, 0) + value
        count += r.count
    shift, replace = ({k: v / count for k, v in t.items()} for t in totals.values())
    print(f"{len(means.concepts)} concepts, {count} patched prompts, split {batches[0].split}")
    print(f"clean loss {float(shift['clean']):.4f}, zero-shot loss {float(shift['zero_shot']):.4f}")
    print("layer | shift own | shift other | replace own | zero-shot + own shift")
    for i, layer in enumerate(means.layers):
        print(f"{layer:5d} | {float(shift['own'][i]):9.4f} | {float(shift['other'][i]):11.4f} | "
              f"{float(replace['own'][i]):11.4f} | {float(shift['zero_shot_patched'][i]):9.4f}")  # fmt: skip
    z_sum, n = query_head_means(adapter, batches[:half])
    effect = sum(
        function_vector_effects(adapter, b, z_sum / n, generator=torch.Generator().manual_seed(i)).indirect_effect()
        for i, b in enumerate(batches[half:])
    ) / len(batches[half:])
    order = effect.flatten().argsort(descending=True)[:3].tolist()
    heads = ", ".join(f"L{i // effect.shape[1]}H{i % effect.shape[1]} {float(effect.flatten()[i]):+.3f}" for i in order)
    print(f"function-vector heads (probability of the answer gained in shuffled prompts): {heads}")
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
