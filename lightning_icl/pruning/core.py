"""The heuristic core of many pruned subnetworks (Bhaskar et al. 2024), read from their masks.

How often each head is kept (:func:`keep_frequency`), the heads every (or nearly every)
subnetwork keeps (:func:`heuristic_core`), how small a subnetwork can be before it loses
accuracy (:func:`effective_size`), and the summary and report of a sweep of pruning runs
(:func:`summarize_runs`, :func:`write_core_report`).
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_icl.checks import check_number
from lightning_icl.plotting import KEEP_FREQUENCY_DPI, keep_frequency_figure, save


def keep_frequency(masks: Sequence[Tensor]) -> Tensor:
    """``[L, H]`` fraction of the subnetworks (masks ``[L, H]``, 1 = kept) that keep each head.

    Example:
        >>> keep_frequency([torch.tensor([[1, 0], [1, 1]]), torch.tensor([[1, 1], [0, 1]])])
        tensor([[1.0000, 0.5000],
                [0.5000, 1.0000]], dtype=torch.float64)
    """
    if len(masks) == 0:
        raise ValueError("masks is empty: give at least one [L, H] mask")
    tensors = [torch.as_tensor(m, dtype=torch.float64) for m in masks]
    shapes = sorted({tuple(m.shape) for m in tensors})
    if len(shapes) > 1:
        raise ValueError(f"masks must all have one shape [L, H], got shapes {shapes}")
    stacked = torch.stack(tensors)
    if stacked.dim() != 3:
        raise ValueError(f"masks must each be [L, H], got {tuple(stacked.shape[1:])}")
    low, high = float(stacked.min()), float(stacked.max())
    if not (low >= 0 and high <= 1):  # NaN fails too
        raise ValueError(f"masks must hold values in [0, 1] (1 = kept), got values from {low} to {high}")
    return stacked.mean(dim=0)


def heuristic_core(masks: Sequence[Tensor], fraction: float = 1.0) -> Tensor:
    """``[L, H]`` bool: the heads kept by at least ``fraction`` of the subnetworks (1.0: by all).

    Example:
        >>> masks = [torch.tensor([[1, 0], [1, 1]]), torch.tensor([[1, 1], [0, 1]])]
        >>> heuristic_core(masks).nonzero().tolist()  # (layer, head) kept by every subnetwork
        [[0, 0], [1, 1]]
    """
    check_number("fraction", fraction, 0.0, 1.0, low_open=True)
    return keep_frequency(masks) >= fraction - 1e-9


def effective_size(
    results: Sequence[Mapping],
    full_acc: float | Mapping[str, float],
    margin: float = 0.03,
    split: str = "id_seen",
) -> float:
    """100 minus the largest sparsity (in %) whose subnetworks stay within ``margin`` of the full model.

    ``results`` holds one record per pruned subnetwork with ``target_sparsity``, the achieved
    ``sparsity`` (both fractions) and ``accuracy`` (split -> accuracy), as in ``mask.json``.
    Records are grouped by target sparsity (the seeds of one setting); a group qualifies when
    its mean accuracy on ``split`` is at least the full model's minus ``margin`` (a pruned model
    may do better than the full one), and counts at its mean achieved sparsity. With no
    qualifying group the effective size is 100: the task needs the whole model.
    """
    check_number("margin", margin, low=0.0)
    if not isinstance(split, str):
        raise ValueError(f"split must be a split name, got {split!r}")
    if len(results) == 0:
        raise ValueError("results is empty: give at least one record of a pruned subnetwork")
    if isinstance(full_acc, Mapping):
        if split not in full_acc:
            raise ValueError(f"full_acc has no accuracy for split {split!r}, only for {sorted(full_acc)}")
        full = full_acc[split]
        check_number(f"full_acc[{split!r}]", full, 0.0, 1.0)
    else:
        check_number("full_acc", full_acc, 0.0, 1.0)
        full = float(full_acc)
    groups: dict[float, list[Mapping]] = defaultdict(list)
    for i, record in enumerate(results):
        if not isinstance(record, Mapping) or not {"target_sparsity", "sparsity", "accuracy"} <= set(record):
            raise ValueError(f"results[{i}] must hold target_sparsity, sparsity and accuracy (as in mask.json)")
        if split not in record["accuracy"]:
            raise ValueError(f"split {split!r} is not among the results' splits {sorted(record['accuracy'])}")
        groups[round(float(record["target_sparsity"]), 6)].append(record)
    best = 0.0
    for records in groups.values():
        acc = sum(r["accuracy"][split] for r in records) / len(records)
        if acc >= full - margin:
            best = max(best, sum(float(r["sparsity"]) for r in records) / len(records))
    return 100.0 * (1.0 - best)


def summarize_runs(runs: Sequence[dict], fraction: float = 1.0, margin: float = 0.03) -> dict:
    """Keep frequency, heuristic core and effective size (per split) of ``mask.json`` records."""
    masks = [torch.tensor(r["heads"]) for r in runs]
    frequency = keep_frequency(masks)
    core = heuristic_core(masks, fraction)
    full = runs[0]["full_accuracy"]
    return {
        "runs": list(runs),
        "full_accuracy": full,
        "frequency": frequency.tolist(),
        "mlp_frequency": keep_frequency([torch.tensor(r["mlps"])[None] for r in runs])[0].tolist(),
        "fraction": fraction,
        "core": [[layer, head] for layer, head in core.nonzero().tolist()],
        "margin": margin,
        "effective_size": {split: effective_size(runs, full, margin, split) for split in full},
    }


def write_core_report(summary: dict, out: str) -> list[str]:
    """``runs.csv``, ``core.md``, ``core.json`` and ``head_frequency.png`` in ``out``."""
    os.makedirs(out, exist_ok=True)
    runs, full = summary["runs"], summary["full_accuracy"]
    splits = list(full)
    columns = ["target_sparsity", "seed", "sparsity", "head_sparsity", "kept_heads", "kept_mlps", "seconds"]
    rows = [
        {
            "target_sparsity": r["target_sparsity"],
            "seed": r["seed"],
            "sparsity": round(r["sparsity"], 4),
            "head_sparsity": round(r["head_sparsity"], 4),
            "kept_heads": int(sum(map(sum, r["heads"]))),
            "kept_mlps": int(sum(r["mlps"])),
            "seconds": round(r.get("seconds", float("nan")), 1),
            **{f"acc_{s}": round(r["accuracy"][s], 4) for s in splits},
        }
        for r in runs
    ]
    paths = [os.path.join(out, name) for name in ("runs.csv", "core.md", "core.json", "head_frequency.png")]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, *(f"acc_{s}" for s in splits)])
        writer.writeheader()
        writer.writerows(rows)
    with open(paths[1], "w") as f:
        f.write(_markdown(summary, rows, splits))
    with open(paths[2], "w") as f:
        json.dump(summary, f, indent=1)
    save(keep_frequency_figure(summary), paths[3], KEEP_FREQUENCY_DPI)
    return paths


def _markdown(summary: dict, rows: list[dict], splits: list[str]) -> str:
    def table(header: list[str], body: list[list]) -> list[str]:
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
        return [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(v) for v in row) + " |" for row in body),
        ]

    full = summary["full_accuracy"]
    freq = summary["frequency"]
    n_runs = len(summary["runs"])
    lines = ["# Subnetworks and the heuristic core", ""]
    lines += ["Full model accuracy:", "", *table(splits, [[full[s] for s in splits]]), ""]
    lines += [f"## Runs ({n_runs})", ""]
    keys = list(rows[0])
    lines += [*table(keys, [[r[k] for k in keys] for r in rows]), ""]
    lines += ["## Head keep frequency (fraction of subnetworks keeping each head)", ""]
    lines += [*table(["layer", *(f"head {h}" for h in range(len(freq[0])))], [[i, *f] for i, f in enumerate(freq)])]
    lines += ["", "MLP keep frequency per layer: " + ", ".join(f"{v:.2f}" for v in summary["mlp_frequency"]), ""]
    core = ", ".join(f"L{layer}H{head}" for layer, head in summary["core"]) or "(none)"
    lines += [f"## Heuristic core (heads kept by >= {summary['fraction']:.0%} of subnetworks)", "", core, ""]
    lines += [f"## Effective size (100 - largest sparsity % within {summary['margin']} of the full model)", ""]
    lines += [*table(splits, [[summary["effective_size"][s] for s in splits]]), ""]
    return "\n".join(lines)
