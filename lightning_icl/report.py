"""Figures from a run directory: training curves and per-shot ICL curves."""

from __future__ import annotations

import math
import os

import matplotlib
import yaml

from lightning_icl.records import read_jsonl, read_metrics_csv

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METRIC_LABELS = {"loss": "cross-entropy (nats)", "acc": "accuracy", "mse": "squared error"}


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads Lightning's ``!!python/tuple`` (and other python tags) as plain data."""


def _plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", _plain)


def load_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.load(f, Loader=_Loader) or {}


def hyperparameters(run_dir: str) -> dict:
    """Flat hyperparameters of a run: ``hparams.yaml`` (CSVLogger) merged with ``config.yaml``'s
    ``model``/``data`` ``init_args`` (LightningCLI), the model's ``transformer`` and ``optimizer``
    fields included under their own names."""
    flat: dict = {}
    config = os.path.join(run_dir, "config.yaml")
    if os.path.exists(config):
        cfg = load_yaml(config)
        for part in ("model", "data"):
            section = cfg.get(part) or {}
            flat.update(section.get("init_args", section) if isinstance(section, dict) else {})
    hparams = os.path.join(run_dir, "hparams.yaml")
    if os.path.exists(hparams):
        flat.update(load_yaml(hparams))
    for group in ("transformer", "optimizer"):  # ICLModule's configs: their fields by name too (d_model, lr)
        if isinstance(flat.get(group), dict):
            flat.update({k: v for k, v in flat[group].items() if k not in flat})
    return flat


def answer_chance(hparams: dict) -> float | None:
    """Accuracy of guessing the answer uniformly, for token tasks (``1 / vocab_size``), from a run's hyperparameters."""
    task = hparams.get("task")
    if isinstance(task, dict) and task.get("kind") == "tokens" and task.get("vocab_size"):
        return 1.0 / task["vocab_size"]
    return None


def plot_training_curves(
    series: dict[str, list[tuple[int, float]]], out: str, chance: float | None = None
) -> str | None:
    """Train loss and every evaluation metric over steps, one panel per metric kind (accuracy on
    [0, 1], with the chance of guessing the answer when ``chance`` is given)."""
    kinds = {"loss": [], "acc": [], "mse": []}
    for key in series:
        base = key.split("/")[-1]
        if base in kinds:
            kinds[base].append(key)
    panels = [(k, keys) for k, keys in kinds.items() if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (kind, keys) in zip(axes[0], panels, strict=True):
        for key in sorted(keys):
            steps, values = zip(*series[key], strict=True)
            train = key.startswith("train")
            ax.plot(steps, values, label=key, alpha=0.5 if train else 1.0, lw=0.8 if train else 1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(METRIC_LABELS[kind])
        if kind in ("loss", "mse"):
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.02)
            if chance is not None:
                ax.axhline(chance, color="black", ls=":", lw=1, label=f"chance ({chance:.2g})")
        ax.set_title(f"{kind} over training (all shots)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def plot_icl_curves(
    rows: list[dict], out: str, stage: str = "val", max_steps_shown: int = 4, chance: float | None = None
) -> str | None:
    """Per-shot metric for each split, at a few evaluation steps (early to late).

    One row of panels per metric with a shared y axis, so splits compare at a glance; accuracy on
    [0, 1] with the chance of guessing the answer when ``chance`` is given.
    """
    rows = [r for r in rows if r["stage"] == stage]
    if not rows:
        return None
    metrics = sorted({r["metric"] for r in rows})
    splits = list(dict.fromkeys(r["split"] for r in rows))
    steps = sorted({r["step"] for r in rows})
    if len(steps) > max_steps_shown:
        steps = sorted({steps[round(i * (len(steps) - 1) / (max_steps_shown - 1))] for i in range(max_steps_shown)})
    fig, axes = plt.subplots(
        len(metrics), len(splits), figsize=(4.2 * len(splits), 3.4 * len(metrics)), squeeze=False, sharey="row"
    )
    cmap = plt.get_cmap("viridis")
    for (row, metric), (col, split) in ((m, s) for m in enumerate(metrics) for s in enumerate(splits)):
        ax = axes[row][col]
        for i, step in enumerate(steps):
            for r in rows:
                if r["step"] == step and r["metric"] == metric and r["split"] == split:
                    ys = [math.nan if v is None else v for v in r["by_shot"]]
                    colour = cmap(0.9 * i / max(1, len(steps) - 1))
                    ax.plot(range(len(ys)), ys, marker=".", color=colour, label=f"step {step}")
        ax.set_title(f"{split}: {metric} per shot", fontsize=10)
        ax.set_xlabel("shot (examples before the answer)")
        if col == 0:
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.xaxis.get_major_locator().set_params(integer=True)
        if metric == "mse":
            ax.set_yscale("log")
        if metric == "acc":
            ax.set_ylim(0, 1.02)
            if chance is not None:
                ax.axhline(chance, color="black", ls=":", lw=1, label="chance")
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def curves_as_rows(records: list[dict]) -> list[dict]:
    """``ICLCurves`` records (``curves.jsonl``) in the per-shot layout of ``icl_curves.jsonl``, for
    models that log no per-shot curve of their own (a Hugging Face model, say)."""
    rows = []
    for record in records:
        for split, curves in record.get("splits", {}).items():
            for metric in ("loss", "acc", "mse"):
                if curves.get(metric):
                    rows.append({"step": record["step"], "stage": "val", "split": split, "metric": metric,
                                 "by_shot": curves[metric]})  # fmt: skip
    return rows


def write_fit_report(log_dir: str) -> list[str]:
    """Write ``training_curves.png`` and ``icl_curves.png`` into ``log_dir``; return the paths written.

    The per-shot curves come from the module's ``icl_curves.jsonl``, or, where there is none,
    from an ``ICLCurves`` callback's ``curves.jsonl``.
    """
    written = []
    chance = answer_chance(hyperparameters(log_dir))
    metrics = os.path.join(log_dir, "metrics.csv")
    if os.path.exists(metrics):
        path = plot_training_curves(read_metrics_csv(metrics), os.path.join(log_dir, "training_curves.png"), chance)
        written += [path] if path else []
    rows = per_shot_rows(log_dir)
    if rows:
        path = plot_icl_curves(rows, os.path.join(log_dir, "icl_curves.png"), chance=chance)
        written += [path] if path else []
    return written


def per_shot_rows(log_dir: str) -> list[dict]:
    """Per-shot curves of a run: ``icl_curves.jsonl``, else ``curves.jsonl`` (the ``ICLCurves`` callback)."""
    curves = os.path.join(log_dir, "icl_curves.jsonl")
    if os.path.exists(curves):
        return read_jsonl(curves)
    callback = os.path.join(log_dir, "curves.jsonl")
    return curves_as_rows(read_jsonl(callback)) if os.path.exists(callback) else []
