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
import yaml

from lightning_icl.callbacks.base import draw_heatmap
from lightning_icl.callbacks.circuits import draw_jaccard
from lightning_icl.report import plot_icl_curves, plot_training_curves, read_curves, read_metrics_csv

PHASE_METRIC = "val/ood_unseen/acc"


# ---- reading a run ----------------------------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    ``model``/``data`` ``init_args`` (LightningCLI)."""
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
    return flat


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
    """Concept decodability per layer over training (heatmap) and per layer at the end."""
    steps = [r["step"] for r in records]
    cd = torch.tensor([r["cd"] for r in records]).T  # [L, evaluations]
    by_shot = bool(records[-1].get("cd_by_shot"))
    ratios = [2, 1, 1] if by_shot else [2, 1]
    fig, axes = plt.subplots(1, len(ratios), figsize=(15 if by_shot else 11, 3.8), gridspec_kw={"width_ratios": ratios})
    left, right = axes[:2]
    shots_ax = axes[2] if by_shot else None
    image = left.imshow(cd, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    left.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=6)
    left.set_yticks(range(cd.shape[0]))
    left.set_xlabel("optimizer step")
    left.set_ylabel("layer")
    left.set_title("concept decodability per layer over training", fontsize=9)
    fig.colorbar(image, ax=left, label="leave-one-out kNN accuracy")
    last = records[-1]
    if shots_ax is not None:  # decodability against the number of examples seen
        for layer, row in enumerate(last["cd_by_shot"]):
            shots_ax.plot(range(len(row)), row, ".-", label=f"layer {layer}")
        if last.get("concepts"):
            shots_ax.axhline(1 / len(last["concepts"]), color="grey", ls=":", label="chance")
        shots_ax.set_ylim(0, 1.02)
        shots_ax.set_xlabel("shot (examples before the answer)")
        shots_ax.set_ylabel("decodability (kNN accuracy)")
        shots_ax.set_title(f"decodability by shot (step {last['step']})", fontsize=9)
        shots_ax.legend(fontsize=7)
    right.plot(range(cd.shape[0]), last["cd"], "o-", label="kNN (k-nearest neighbours)")
    if last.get("probe"):
        right.plot(range(cd.shape[0]), last["probe"], "s--", label="ridge probe (held out)")
    if last.get("concepts"):
        right.axhline(1 / len(last["concepts"]), color="grey", ls=":", label="chance")
    right.set_ylim(0, 1.02)
    right.set_xticks(range(cd.shape[0]))
    right.set_xlabel("layer")
    right.set_ylabel("decodability (accuracy)")
    right.set_title(f"at step {last['step']} (peak: layer {last['peak_layer']})", fontsize=9)
    right.legend(fontsize=7)
    return _save(fig, out)


def plot_head_importance(ablation: dict | None, attribution: dict | None, out: str) -> str | None:
    """The latest ``[L, H]`` ablation effect and attribution estimate, side by side."""
    panels = [(r, k, t) for r, k, t in (
        (ablation, "loss_effect", "{mode} ablation: loss increase"),
        (attribution, "loss_effect_estimate", "attribution -dL/dg (first-order estimate)"),
    ) if r is not None]  # fmt: skip
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (record, key, title) in zip(axes[0], panels, strict=True):
        title = title.format(mode=record.get("mode", "zero")) + f" (step {record['step']})"
        draw_heatmap(ax, record[key], title, "loss change (nats)")
    return _save(fig, out)


ATTENTION_PANELS = ("entropy", "max_prob", "same_label_mass", "previous_token", "lse")


def plot_attention(record: dict, out: str) -> str | None:
    """Per-head attention statistics of one record, one heatmap each (class mass per class)."""
    panels = [(name, record[name]) for name in ATTENTION_PANELS if name in record]
    if "class_mass" in record:
        mass = torch.tensor(record["class_mass"])  # [L, H, C]
        panels += [(f"class_mass, class {c}", mass[..., c]) for c in range(mass.shape[-1])]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, panels, strict=False):
        units = "nats" if name in ("entropy", "lse") else "probability mass"
        draw_heatmap(ax, values, name, units)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"attention statistics at step {record['step']}", fontsize=10)
    return _save(fig, out)


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
    from lightning_icl.prune_cli import plot_keep_frequency

    return plot_keep_frequency(summary, out)


def plot_phase_diagram(points: list[tuple[float, float, float]], x: str, y: str, metric: str, out: str) -> str:
    """``metric`` over a grid of two hyperparameters, one cell per ``(x, y, value)``."""
    xs = sorted({p[0] for p in points})
    ys = sorted({p[1] for p in points})
    grid = torch.full((len(ys), len(xs)), float("nan"))
    for px, py, value in points:
        grid[ys.index(py), xs.index(px)] = value
    fig, ax = plt.subplots(figsize=(1.6 + 0.8 * len(xs), 1.4 + 0.6 * len(ys)))
    image = ax.imshow(grid, origin="lower", cmap="magma", vmin=0, vmax=max(1.0, float(grid.nan_to_num().max())))
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    for (i, j), value in zip(((i, j) for i in range(len(ys)) for j in range(len(xs))), grid.flatten(), strict=True):
        if not math.isnan(value):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.6 else "black"
            )
    ax.set_title(f"{metric} (final) over the sweep", fontsize=9)
    fig.colorbar(image, ax=ax, label=metric)
    return _save(fig, out)


# ---- the report -------------------------------------------------------------------------------
def run_figures(run_dir: str, out: str, prefix: str = "") -> list[tuple[str, str]]:
    """Every figure ``run_dir`` has data for, written into ``out``; ``[(title, path), ...]``."""
    figures: list[tuple[str, str]] = []

    def add(title: str, make: Callable[[str], str | None], name: str) -> None:
        path = make(os.path.join(out, f"{prefix}{name}.png"))
        if path:
            figures.append((title, path))

    metrics = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(metrics):
        add("Loss and accuracy per split", lambda p: plot_training_curves(read_metrics_csv(metrics), p), "training")
    curves = os.path.join(run_dir, "icl_curves.jsonl")
    if os.path.exists(curves):
        add("Per-shot curves at several steps", lambda p: plot_icl_curves(read_curves(curves), p), "per_shot")
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
        raise ValueError(f"run directories not found: {missing}")
    os.makedirs(out, exist_ok=True)
    sections: list[tuple[str, list[tuple[str, str]], dict]] = []
    points = []
    many = len(run_dirs) > 1
    for i, run_dir in enumerate(tqdm(run_dirs, desc="runs", unit="run", disable=not many)):
        prefix = f"run{i}_" if many else ""
        figures = run_figures(run_dir, out, prefix)
        finals = final_metrics(run_dir)
        sections.append((run_dir, figures, finals))
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
    index = os.path.join(out, "index.html")
    with open(index, "w") as f:
        f.write(_html(summary, sections))
    return index


def _img(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(os.path.basename(path))}">'


def _html(summary: list[tuple[str, str]], sections: list[tuple[str, list[tuple[str, str]], dict]]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lightning_icl report</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "img{max-width:100%;border:1px solid #ddd;margin:.4em 0}table{border-collapse:collapse;font-size:.85em}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}th{text-align:left}</style></head><body>",
        "<h1>lightning_icl report</h1>",
    ]
    for title, path in summary:
        parts += [f"<h2>{html.escape(title)}</h2>", _img(path)]
    for run_dir, figures, finals in sections:
        parts.append(f"<h2>{html.escape(run_dir)}</h2>")
        evals = {k: v for k, v in finals.items() if k.startswith(("val/", "test/")) and "/" in k}
        if evals:
            parts.append("<table><tr><th>final metric</th><th>value</th></tr>")
            parts += [f"<tr><th>{html.escape(k)}</th><td>{v:.4g}</td></tr>" for k, v in sorted(evals.items())]
            parts.append("</table>")
        if not figures:
            parts.append("<p>Nothing to draw: no metrics.csv, icl_curves.jsonl or callback records here.</p>")
        for title, path in figures:
            parts += [f"<h3>{html.escape(title)}</h3>", _img(path)]
    parts.append("</body></html>")
    return "\n".join(parts)


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
