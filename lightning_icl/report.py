"""Figures from a run directory: training curves and per-shot ICL curves."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METRIC_LABELS = {"loss": "cross-entropy (nats)", "acc": "accuracy", "mse": "squared error"}


def read_metrics_csv(path: str) -> dict[str, list[tuple[int, float]]]:
    """``metric -> [(step, value), ...]`` from a CSVLogger ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series[key].append((step, float(value)))
    return dict(series)


def read_curves(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(series: dict[str, list[tuple[int, float]]], out: str) -> str | None:
    """Train loss and every evaluation metric over steps, one panel per metric kind."""
    kinds = {"loss": [], "acc": [], "mse": []}
    for key in series:
        base = key.split("/")[-1]
        if base in kinds:
            kinds[base].append(key)
    panels = [(k, keys) for k, keys in kinds.items() if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (kind, keys) in zip(axes[0], panels, strict=True):
        for key in sorted(keys):
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, label=key, alpha=0.6 if key.startswith("train") else 1.0)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(METRIC_LABELS[kind])
        if kind in ("loss", "mse"):
            ax.set_yscale("log")
        ax.set_title(f"{kind} over training (all shots)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_icl_curves(rows: list[dict], out: str, stage: str = "val", max_steps_shown: int = 4) -> str | None:
    """Per-shot metric for each split, at a few evaluation steps (early to late)."""
    rows = [r for r in rows if r["stage"] == stage]
    if not rows:
        return None
    metrics = sorted({r["metric"] for r in rows})
    splits = list(dict.fromkeys(r["split"] for r in rows))
    steps = sorted({r["step"] for r in rows})
    if len(steps) > max_steps_shown:
        steps = [steps[round(i * (len(steps) - 1) / (max_steps_shown - 1))] for i in range(max_steps_shown)]
    fig, axes = plt.subplots(len(metrics), len(splits), figsize=(4 * len(splits), 3.3 * len(metrics)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for (row, metric), (col, split) in ((m, s) for m in enumerate(metrics) for s in enumerate(splits)):
        ax = axes[row][col]
        for i, step in enumerate(steps):
            for r in rows:
                if r["step"] == step and r["metric"] == metric and r["split"] == split:
                    ys = [math.nan if v is None else v for v in r["by_shot"]]
                    ax.plot(
                        range(len(ys)), ys, marker=".", color=cmap(i / max(1, len(steps) - 1)), label=f"step {step}"
                    )
        ax.set_title(f"{split}: {metric} per shot")
        ax.set_xlabel("shot (examples before the answer)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.xaxis.get_major_locator().set_params(integer=True)
        if metric == "mse":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_fit_report(log_dir: str) -> list[str]:
    """Write ``training_curves.png`` and ``icl_curves.png`` into ``log_dir``; return the paths written."""
    written = []
    metrics = os.path.join(log_dir, "metrics.csv")
    if os.path.exists(metrics):
        path = plot_training_curves(read_metrics_csv(metrics), os.path.join(log_dir, "training_curves.png"))
        written += [path] if path else []
    curves = os.path.join(log_dir, "icl_curves.jsonl")
    if os.path.exists(curves):
        path = plot_icl_curves(read_curves(curves), os.path.join(log_dir, "icl_curves.png"))
        written += [path] if path else []
    return written
