"""``lightning-icl report``: figures and one self-contained HTML page from run directories.

Reads what :class:`~lightning_icl.ICLModule` and the callbacks write into a run directory
(``metrics.csv``, ``icl_curves.jsonl``, ``decodability*.jsonl``, ``ablation*.jsonl``,
``attribution*.jsonl``, ``attention*.jsonl``, ``curves*.jsonl``, ``circuits*.jsonl``,
``patching*.jsonl``), the
output of ``lightning-icl core`` (``core.json``), and the hyperparameters (``hparams.yaml`` or
``config.yaml``), and draws every figure the run has data for. Several runs of a sweep also give
a phase diagram of a final metric over two hyperparameters (He et al.'s n_i.d. x alpha grid).

    lightning-icl report runs/quickstart/version_0 --out report/
    lightning-icl report runs/sweep/*/version_0 --out sweep_report/ --phase num_tasks,alpha

A logger folder (``runs/quickstart``) stands for its ``version_N`` folders. Versions that are
segments of one resumed run (the same ``run_id`` in their ``run.json``) are drawn as one run,
joined step by step (:func:`lightning_icl.records.merge_segments`).
"""

from __future__ import annotations

import argparse
import base64
import glob
import html
import json
import math
import os
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from lightning_icl.callbacks.base import draw_heatmap
from lightning_icl.callbacks.circuits import draw_jaccard
from lightning_icl.records import expand_run_dirs, merge_segments, read_jsonl, read_metrics_csv, run_segments
from lightning_icl.report import (
    answer_chance,
    hyperparameters,
    per_shot_rows,
    plot_icl_curves,
    plot_training_curves,
)

PHASE_METRIC = "val/ood_unseen/acc"


# ---- reading a run ----------------------------------------------------------------------------
def callback_records(run_dir: str, name: str) -> dict[str, list[dict]]:
    """``file stem -> records`` for ``<name>.jsonl`` and tagged ``<name>_<tag>.jsonl`` files."""
    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, f"{name}*.jsonl"))):
        stem = os.path.basename(path)[: -len(".jsonl")]
        if stem == name or stem.startswith(f"{name}_"):
            records = read_jsonl(path)
            if records:
                found[stem] = records
    return found


def final_metrics(run_dir: str) -> dict[str, float]:
    """The last logged value of every metric in ``metrics.csv``."""
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        return {}
    return {key: values[-1][1] for key, values in read_metrics_csv(path).items() if values}


# ---- figures ----------------------------------------------------------------------------------
def _save(fig, out: str) -> str:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_decodability(records: list[dict], out: str) -> str:
    """Concept decodability per layer against its baselines, by shot, and over training."""
    from lightning_icl.callbacks.decodability import decodability_figure

    return _save(decodability_figure(records), out)


ATTRIBUTION_TITLES = {
    "integrated": "integrated gradients ({steps} steps)",
    "gradient": "first-order gradient at the clean point",
    "training": "first-order gradient, training steps",
}


def plot_head_importance(ablation: dict | None, attribution: dict | None, out: str) -> str | None:
    """The latest ``[L, H]`` ablation effect and attribution estimate side by side, on one colour
    scale (so that an estimate near zero looks near zero), with their rank agreement."""
    panels = []
    if ablation is not None:
        panels.append((ablation["loss_effect"], f"{ablation.get('mode', 'zero')} ablation (step {ablation['step']})"))
    if attribution is not None:
        what = ATTRIBUTION_TITLES.get(attribution.get("method", "training"), "attribution")
        what = what.format(steps=attribution.get("steps"))
        panels.append((attribution["loss_effect_estimate"],
                       f"{what}, {attribution.get('mode', 'zero')} ablation (step {attribution['step']})"))  # fmt: skip
    if not panels:
        return None
    values = [torch.tensor(v, dtype=torch.float32) for v, _ in panels]
    limit = max(float(v.abs().max()) for v in values) or 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), squeeze=False)
    image = None
    for ax, value, (_, title) in zip(axes[0], values, panels, strict=True):
        image = draw_heatmap(ax, value, title, "", vmin=-limit, vmax=limit, colorbar_on=False)
    fig.colorbar(image, ax=list(axes[0]), label="loss increase when the head is removed (nats)")
    if ablation is not None and attribution is not None:
        from lightning_icl.metrics.functional import spearman

        agreement = spearman(values[0], values[1])
        same = "" if ablation["step"] == attribution["step"] else " (different steps)"
        fig.suptitle(f"head importance: rank agreement (Spearman) {agreement:.2f}{same}", fontsize=10)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_attention(record: dict, out: str) -> str | None:
    """Per-head attention statistics of one record, one heatmap each (class mass per key class)."""
    from lightning_icl.callbacks.attention import attention_figure

    fig = attention_figure(record)
    return None if fig is None else _save(fig, out)


def plot_circuits(records: list[dict], out: str) -> str:
    """Latest Jaccard matrix of the families' head sets, and pairwise Jaccard over training."""
    last = records[-1]
    names = last["families"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    draw_jaccard(left, last)
    steps = [r["step"] for r in records]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            right.plot(steps, [r["jaccard"][i][j] for r in records], "o-", label=f"{names[i]} / {names[j]}")
    right.plot(steps, [r["shared_over_union"] for r in records], "k--", label="shared by all / union")
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel("optimizer step")
    right.set_ylabel("overlap")
    right.set_title("circuit overlap over training", fontsize=9)
    right.legend(fontsize=7)
    return _save(fig, out)


def plot_concept_curves(records: list[dict], out: str) -> str | None:
    """Per-concept loss: per shot at the last evaluation, and at the last shot over training (``ICLCurves``)."""
    last = records[-1]
    split = next((name for name, c in last["splits"].items() if c.get("loss_by_concept")), None)
    if split is None:
        return None
    concepts = list(last["splits"][split]["loss_by_concept"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    cmap = plt.get_cmap("tab10" if len(concepts) <= 10 else "viridis")
    for i, concept in enumerate(concepts):
        colour = cmap(i if len(concepts) <= 10 else i / max(1, len(concepts) - 1))
        curve = [math.nan if v is None else v for v in last["splits"][split]["loss_by_concept"][concept]]
        left.plot(range(len(curve)), curve, ".-", color=colour, label=f"concept {concept}")
        steps, values = [], []
        for r in records:
            c = r["splits"].get(split, {}).get("loss_by_concept", {}).get(concept)
            if c:
                seen = [v for v in c if v is not None]
                steps.append(r["step"])
                values.append(seen[-1] if seen else math.nan)
        right.plot(steps, values, ".-", color=colour, label=f"concept {concept}")
    left.set_xlabel("shot (examples before the answer)")
    left.set_title(f"{split}: loss per shot and concept (step {last['step']})", fontsize=9)
    right.set_xlabel("optimizer step")
    right.set_title(f"{split}: last-shot loss per concept over training", fontsize=9)
    for ax in (left, right):
        ax.set_ylabel("loss at the answer")
        ax.grid(alpha=0.3)
        if len(concepts) <= 10:
            ax.legend(fontsize=7)
    return _save(fig, out)


def plot_patching(record: dict, out: str) -> str:
    from lightning_icl.callbacks.patching import ConceptPatching

    return _save(ConceptPatching().figure(record), out)


def plot_core(summary: dict, out: str) -> str:
    """Keep frequency of every head over the subnetworks of ``lightning-icl core`` (core outlined)."""
    from lightning_icl.plotting import plot_keep_frequency

    return plot_keep_frequency(summary, out)


def plot_phase_diagram(points: list[tuple[float, float, float]], x: str, y: str, metric: str, out: str) -> str:
    """``metric`` over a grid of two hyperparameters, one cell per ``(x, y)``: the mean over the runs
    there (seeds), written with its spread (``± std (n runs)``) where several runs share a cell."""
    xs = sorted({p[0] for p in points})
    ys = sorted({p[1] for p in points})
    cells: dict[tuple[int, int], list[float]] = {}
    for px, py, value in points:
        cells.setdefault((ys.index(py), xs.index(px)), []).append(value)
    grid = torch.full((len(ys), len(xs)), float("nan"))
    for (i, j), values in cells.items():
        grid[i, j] = sum(values) / len(values)
    fig, ax = plt.subplots(figsize=(2.0 + 1.0 * len(xs), 1.8 + 0.7 * len(ys)))
    image = ax.imshow(grid, origin="lower", cmap="magma", vmin=0, vmax=max(1.0, float(grid.nan_to_num().max())))
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    for (i, j), values in cells.items():
        mean = sum(values) / len(values)
        text = f"{mean:.2f}"
        if len(values) > 1:
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            text += f"\n±{std:.2f} ({len(values)})"
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if mean < 0.6 else "black")
    seeds = max(len(v) for v in cells.values())
    ax.set_title(f"{metric} (final) over the sweep" + (f", mean of up to {seeds} runs" if seeds > 1 else ""),
                 fontsize=9)  # fmt: skip
    fig.colorbar(image, ax=ax, label=metric)
    return _save(fig, out)


SEED_KEYS = ("seed", "seed_everything", "data_seed")
"""Hyperparameters that tell apart the repeats of one configuration."""


def seed_groups(run_dirs: Sequence[str]) -> dict[str, list[str]]:
    """Runs that differ only in their seeds, grouped: ``label -> run directories`` (groups of two or more)."""
    groups: dict[str, list[str]] = {}
    for run_dir in run_dirs:
        hp = {k: v for k, v in hyperparameters(run_dir).items() if k not in SEED_KEYS}
        groups.setdefault(json.dumps(hp, sort_keys=True, default=str), []).append(run_dir)
    varying = _varying(run_dirs)
    named = {}
    for runs in groups.values():
        if len(runs) < 2:
            continue
        hp = hyperparameters(runs[0])
        label = ", ".join(f"{k}={hp[k]}" for k in varying if k in hp and k not in SEED_KEYS) or "all runs"
        named[label] = runs
    return named


def _varying(run_dirs: Sequence[str]) -> list[str]:
    """The scalar hyperparameters whose value differs between runs."""
    seen: dict[str, set] = {}
    for run_dir in run_dirs:
        for k, v in hyperparameters(run_dir).items():
            if isinstance(v, (int, float, str, bool)):
                seen.setdefault(k, set()).add(v)
    return sorted(k for k, values in seen.items() if len(values) > 1)


def plot_seed_bands(groups: dict[str, list[str]], out: str) -> str | None:
    """Each evaluation split's accuracy (or squared error) over training: the mean over a group's
    seeds with a band from the lowest to the highest seed, one line per group."""
    series: dict[str, dict[str, list[dict[int, float]]]] = {}  # split -> group -> [step -> value] per run
    for label, runs in groups.items():
        for run_dir in runs:
            path = os.path.join(run_dir, "metrics.csv")
            if not os.path.exists(path):
                continue
            for key, values in read_metrics_csv(path).items():
                parts = key.split("/")
                if len(parts) == 3 and parts[0] == "val" and parts[2] in ("acc", "mse"):
                    series.setdefault(f"{parts[1]} {parts[2]}", {}).setdefault(label, []).append(dict(values))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4.6 * len(series), 3.8), squeeze=False, sharey=True)
    for ax, (name, by_group) in zip(axes[0], sorted(series.items()), strict=True):
        for label, runs in by_group.items():
            steps = sorted(set.intersection(*(set(r) for r in runs)))
            if not steps:
                continue
            values = torch.tensor([[r[s] for s in steps] for r in runs])  # [seeds, steps]
            line = ax.plot(steps, values.mean(0), label=f"{label} ({len(runs)} seeds)")[0]
            ax.fill_between(steps, values.min(0).values, values.max(0).values, color=line.get_color(), alpha=0.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        if name.endswith("acc"):
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean over seeds (band: lowest to highest)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, out)


# ---- the report -------------------------------------------------------------------------------
def run_figures(run_dir: str, out: str, prefix: str = "") -> list[tuple[str, str]]:
    """Every figure ``run_dir`` has data for, written into ``out``; ``[(title, path), ...]``."""
    figures: list[tuple[str, str]] = []

    def add(title: str, make: Callable[[str], str | None], name: str) -> None:
        path = make(os.path.join(out, f"{prefix}{name}.png"))
        if path:
            figures.append((title, path))

    chance = answer_chance(hyperparameters(run_dir))
    metrics = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(metrics):
        add("Loss and accuracy per split",
            lambda p: plot_training_curves(read_metrics_csv(metrics), p, chance), "training")  # fmt: skip
    rows = per_shot_rows(run_dir)
    if rows:
        add("Per-shot curves at several steps", lambda p: plot_icl_curves(rows, p, chance=chance), "per_shot")
    for stem, records in callback_records(run_dir, "curves").items():
        if any(c.get("loss_by_concept") for c in records[-1]["splits"].values()):
            add(f"Per-concept curves ({stem})", lambda p, r=records: plot_concept_curves(r, p), f"{stem}_by_concept")
    for stem, records in callback_records(run_dir, "decodability").items():
        add(f"Concept decodability ({stem})", lambda p, r=records: plot_decodability(r, p), stem)
    ablation = callback_records(run_dir, "ablation")
    attribution = callback_records(run_dir, "attribution")
    if ablation or attribution:
        last = lambda found: next(iter(found.values()))[-1] if found else None
        add("Head importance: ablation and attribution",
            lambda p: plot_head_importance(last(ablation), last(attribution), p), "heads")  # fmt: skip
    for stem, records in callback_records(run_dir, "attention").items():
        add(f"Attention statistics ({stem})", lambda p, r=records: plot_attention(r[-1], p), stem)
    for stem, records in callback_records(run_dir, "circuits").items():
        add(f"Circuit overlap ({stem})", lambda p, r=records: plot_circuits(r, p), stem)
    for stem, records in callback_records(run_dir, "patching").items():
        add(f"Concept patching and function-vector heads ({stem})", lambda p, r=records: plot_patching(r[-1], p), stem)
    core = os.path.join(run_dir, "core.json")
    if os.path.exists(core):
        with open(core) as f:
            summary = json.load(f)
        add("Subnetworks: head keep frequency", lambda p: plot_core(summary, p), "core")
    return figures


def write_report(
    run_dirs: Sequence[str], out: str, phase: tuple[str, str] | None = None, metric: str = PHASE_METRIC
) -> str:
    """Figures for every run, a phase diagram over ``phase`` = (x, y) hyperparameters when several
    runs are given, and ``out/index.html`` showing them all (images embedded). Returns its path."""
    from tqdm.auto import tqdm

    missing = [d for d in run_dirs if not os.path.isdir(d)]
    if missing:
        raise ValueError(f"run directories not found: {', '.join(missing)}")
    os.makedirs(out, exist_ok=True)
    runs = []  # (title, directory): the segments of a resumed run joined into one folder under out/
    for i, segments in enumerate(run_segments(expand_run_dirs(list(run_dirs)))):
        title = segments[0] if len(segments) == 1 else " + ".join(segments) + " (one resumed run)"
        runs.append((title, merge_segments(segments, os.path.join(out, "joined", f"run{i}"))))
    run_dirs = [d for _, d in runs]
    sections: list[tuple[str, list[tuple[str, str]], dict, dict]] = []
    points = []
    many = len(run_dirs) > 1
    for i, (title, run_dir) in enumerate(tqdm(runs, desc="runs", unit="run", disable=not many)):
        prefix = f"run{i}_" if many else ""
        figures = run_figures(run_dir, out, prefix)
        finals = final_metrics(run_dir)
        sections.append((title, figures, finals, hyperparameters(run_dir)))
        if phase is not None:
            hp = hyperparameters(run_dir)
            if all(k in hp for k in phase) and metric in finals:
                points.append((float(hp[phase[0]]), float(hp[phase[1]]), finals[metric]))
    summary: list[tuple[str, str]] = []
    if phase is not None:
        if not points:
            raise ValueError(
                f"no run has both hyperparameters {phase} (hparams.yaml or config.yaml) and a final {metric!r}"
            )
        path = plot_phase_diagram(points, phase[0], phase[1], metric, os.path.join(out, "phase_diagram.png"))
        summary.append((f"Phase diagram: {metric} over {phase[0]} x {phase[1]}", path))
    if many and (groups := seed_groups(run_dirs)):
        path = plot_seed_bands(groups, os.path.join(out, "seeds.png"))
        if path:
            summary.append(("Repeats over seeds: mean and spread", path))
    index = os.path.join(out, "index.html")
    with open(index, "w") as f:
        f.write(_html(summary, sections))
    return index


def _img(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(os.path.basename(path))}">'


def _html(summary: list[tuple[str, str]], sections: list[tuple[str, list[tuple[str, str]], dict, dict]]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lightning_icl report</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "img{max-width:100%;border:1px solid #ddd;margin:.4em 0}table{border-collapse:collapse;font-size:.85em;"
        "margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}th{text-align:left}"
        "details{margin:.5em 0}</style></head><body>",
        "<h1>lightning_icl report</h1>",
    ]
    for title, path in summary:
        parts += [f"<h2>{html.escape(title)}</h2>", _img(path)]
    for run_dir, figures, finals, hparams in sections:
        parts.append(f"<h2>{html.escape(run_dir)}</h2>")
        parts += _metrics_table(finals)
        parts += _config_table(hparams)
        if not figures:
            parts.append("<p>Nothing to draw: no metrics.csv, icl_curves.jsonl or callback records here.</p>")
        for title, path in figures:
            parts += [f"<h3>{html.escape(title)}</h3>", _img(path)]
    parts.append("</body></html>")
    return "\n".join(parts)


def _metrics_table(finals: dict[str, float]) -> list[str]:
    """Final evaluation metrics as one row per split and metric: over all shots, first shot, last shot."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in finals.items():
        if not key.startswith(("val/", "test/")) or key.count("/") != 2:
            continue
        base, column = key, "all shots"
        for suffix, name in (("_shot0", "first shot"), ("_last", "last shot")):
            if key.endswith(suffix):
                base, column = key[: -len(suffix)], name
        rows.setdefault(base, {})[column] = value
    if not rows:
        return []
    columns = ("all shots", "first shot", "last shot")
    out = ["<table><tr><th>final (split / metric)</th>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"]
    for base in sorted(rows):
        cells = "".join(f"<td>{rows[base][c]:.4g}</td>" if c in rows[base] else "<td></td>" for c in columns)
        out.append(f"<tr><th>{html.escape(base)}</th>{cells}</tr>")
    out.append("</table>")
    return out


def _config_table(hparams: dict) -> list[str]:
    """The run's hyperparameters (``hparams.yaml``, ``config.yaml``), folded away under a summary line."""
    flat = {}
    for key, value in hparams.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        elif not isinstance(value, list) or len(value) <= 8:
            flat[key] = value
    if not flat:
        return []
    cell = lambda k, v: f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
    rows = "".join(cell(k, v) for k, v in sorted(flat.items()))
    return [f"<details><summary>run configuration ({len(flat)} settings)</summary><table>{rows}</table></details>"]


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="lightning-icl report", description="Figures and an HTML page from run directories."
    )
    parser.add_argument("runs", nargs="+", help="run directories (the logger's version_N folders)")
    parser.add_argument("--out", required=True, help="folder for the figures and index.html")
    parser.add_argument("--phase", default=None, help="two hyperparameters for a phase diagram, e.g. num_tasks,alpha")
    parser.add_argument("--metric", default=PHASE_METRIC, help=f"final metric of the phase diagram ({PHASE_METRIC})")
    args = parser.parse_args(argv)
    phase = None
    if args.phase is not None:
        phase = tuple(p.strip() for p in args.phase.split(","))
        if len(phase) != 2 or not all(phase):
            parser.error(f"--phase takes two hyperparameter names separated by a comma, got {args.phase!r}")
    index = write_report(args.runs, args.out, phase, args.metric)
    print(f"wrote {index}")
    return index
