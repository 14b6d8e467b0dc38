"""Every figure the package draws, and the only module that imports matplotlib.

Each function takes what a run records (a callback's record or history, ``metrics.csv`` series,
per-shot rows, the summary of ``lightning-icl core``) and returns a
:class:`matplotlib.figure.Figure`, or ``None`` when there is nothing to draw. The callbacks and
``lightning-icl report`` draw through the same functions, so a figure looks the same wherever it
is made. Figures are :class:`~matplotlib.figure.Figure` objects written with ``savefig``: no
pyplot, no backend selected, so importing or drawing never changes a notebook's plotting.
matplotlib itself is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

DPI = 110
"""Resolution :func:`save` writes at unless told otherwise (figures are drawn at matplotlib's
``figure.dpi``: their layout is computed there)."""
CURVES_DPI = 130
"""Resolution of the training and per-shot curves and the head-importance panels."""
KEEP_FREQUENCY_DPI = 120
ANNOTATE_CELLS = 64
"""Heatmaps with at most this many cells print each cell's value."""
METRIC_LABELS = {"loss": "cross-entropy (nats)", "acc": "accuracy", "mse": "squared error"}


def _figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **subplots: Any) -> tuple[Figure, Any]:
    """A new figure (no pyplot: nothing registered, no backend chosen) and its ``nrows x ncols`` axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots)


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def save(fig: Figure | None, path: str, dpi: float = DPI, **savefig: Any) -> str | None:
    """Write ``fig`` to ``path`` at ``dpi``, other ``savefig`` keywords passed on; return the
    path, or ``None`` when there is no figure."""
    if fig is None:
        return None
    fig.savefig(path, dpi=dpi, **savefig)
    return path


# ---- heatmaps ---------------------------------------------------------------------------------
def draw_heatmap(
    ax: Axes,
    values,
    title: str,
    colorbar: str,
    row_label: str = "layer",
    col_label: str = "head",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_on: bool = True,
    symmetric: bool = False,
    cmap: str | None = None,
    annotate: bool = True,
    aspect: str = "auto",
    title_size: float = 10,
) -> AxesImage:
    """A ``[rows, cols]`` heatmap on ``ax``; returns the image.

    Diverging colours symmetric around 0 when any value is negative or ``symmetric`` is set (unless ``vmin``/``vmax``
    fix the scale: give them for bounded quantities such as probabilities, so that two figures
    read alike), else viridis, unless ``cmap`` names another map; with ``annotate``, the value of
    each cell is printed on grids of up to ``ANNOTATE_CELLS`` cells.
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    finite = values[torch.isfinite(values)]
    limit = float(finite.abs().max()) if finite.numel() else 1.0
    limit = limit or 1.0
    signed = symmetric or (bool((finite < 0).any()) if vmin is None else vmin < 0)
    if vmin is None and vmax is None and signed:
        vmin, vmax = -limit, limit
    cmap = cmap or ("RdBu_r" if signed else "viridis")
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    ax.set_title(title, fontsize=title_size, wrap=True)
    if annotate and values.numel() <= ANNOTATE_CELLS:
        low, high = image.get_clim()
        for (i, j), value in zip(
            ((i, j) for i in range(values.shape[0]) for j in range(values.shape[1])), values.flatten(), strict=True
        ):
            if not torch.isfinite(value):
                continue
            shade = (float(value) - low) / ((high - low) or 1.0)
            dark = abs(shade - 0.5) > 0.3 if signed else shade < 0.6  # the ends of RdBu, the low end of viridis
            ax.text(j, i, f"{float(value):.2g}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")  # fmt: skip
    if colorbar_on:
        ax.figure.colorbar(image, ax=ax, label=colorbar)
    return image


def heatmap(values, title: str, colorbar: str, **options: Any) -> Figure:
    """A figure of one ``[rows, cols]`` heatmap, sized to the grid; ``options`` are
    :func:`draw_heatmap`'s (``symmetric=True`` for effects such as a loss change, where zero
    means "no effect" and must look the same in every figure)."""
    values = torch.as_tensor(values, dtype=torch.float32)
    width = max(4.8, 1.6 + 0.75 * values.shape[1])
    height = max(3.2, 1.4 + 0.6 * values.shape[0])
    fig, ax = _figure((width, height))
    draw_heatmap(ax, values, title, colorbar, **options)
    fig.tight_layout()
    return fig


# ---- head importance (HeadAblation, HeadAttribution) ------------------------------------------
def ablation_figure(record: dict) -> Figure:
    """The ``[L, H]`` loss effect of a ``HeadAblation`` record, on a scale centred on zero."""
    title = f"{record.get('mode', 'zero')} ablation at step {record['step']}"
    return heatmap(record["loss_effect"], title, "loss increase (nats)", symmetric=True)


def attribution_figure(record: dict) -> Figure:
    """The ``[L, H]`` loss-effect estimate of a ``HeadAttribution`` record, on a scale centred on zero."""
    what = {"integrated": f"integrated gradients ({record.get('steps')} steps)", "gradient": "-dL/dgate at 1",
            "training": "-dL/dgate, training steps"}.get(record.get("method"), "-dL/dgate")  # fmt: skip
    title = f"{what}, {record.get('mode', 'zero')} ablation, step {record['step']}"
    return heatmap(record["loss_effect_estimate"], title, "estimated loss increase (nats)", symmetric=True)


ATTRIBUTION_TITLES = {
    "integrated": "integrated gradients ({steps} steps)",
    "gradient": "first-order gradient at the clean point",
    "training": "first-order gradient, training steps",
}


def head_importance_figure(ablation: dict | None, attribution: dict | None) -> Figure | None:
    """The latest ``[L, H]`` ablation effect and attribution estimate side by side, on one colour
    scale (so that an estimate near zero looks near zero), with their rank agreement.

    Written at ``CURVES_DPI`` with ``bbox_inches="tight"``: its colour bar spans both panels.
    """
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
    fig, axes = _figure((5.2 * len(panels), 3.9), 1, len(panels), squeeze=False)
    image = None
    for ax, value, (_, title) in zip(axes[0], values, panels, strict=True):
        image = draw_heatmap(ax, value, title, "", vmin=-limit, vmax=limit, colorbar_on=False)
    fig.colorbar(image, ax=list(axes[0]), label="loss increase when the head is removed (nats)")
    if ablation is not None and attribution is not None:
        from lightning_icl.metrics.functional import spearman

        agreement = spearman(values[0], values[1])
        same = "" if ablation["step"] == attribution["step"] else " (different steps)"
        fig.suptitle(f"head importance: rank agreement (Spearman) {agreement:.2f}{same}", fontsize=10)
    return fig


# ---- attention statistics (AttentionStatistics) -----------------------------------------------
BOUNDED = ("max_prob", "same_label_mass", "previous_token")
"""Statistics that are probabilities: drawn on a fixed [0, 1] scale."""
PANEL_UNITS = {"entropy": "nats", "lse": "nats", "max_prob": "probability", "same_label_mass": "probability mass",
               "previous_token": "probability"}  # fmt: skip


def attention_figure(record: dict) -> Figure | None:
    """Every per-head statistic of one record as a heatmap; class mass one panel per named key class."""
    panels = [(name, record[name]) for name in ("entropy", "max_prob", "same_label_mass", "previous_token", "lse")
              if name in record]  # fmt: skip
    if "class_mass" in record:
        mass = torch.tensor(record["class_mass"])  # [L, H, C]
        names = record.get("class_names") or [f"class {c}" for c in range(mass.shape[-1])]
        panels += [(f"mass on {names[c]} keys", mass[..., c]) for c in range(mass.shape[-1])]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = _figure((4.0 * cols, 3.2 * rows), rows, cols, squeeze=False)
    for ax, (name, values) in zip(axes.flat, panels, strict=False):
        bounded = name in BOUNDED or name.startswith("mass on")
        units = PANEL_UNITS.get(name, "probability mass")
        low = None if name == "lse" else 0.0  # a log-sum-exp may be negative; the rest are not
        draw_heatmap(ax, values, name.replace("_", " "), units, vmin=low, vmax=1.0 if bounded else None)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"attention statistics per head, mean over the batch's positions (step {record['step']})",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig


# ---- concept decodability (ConceptDecodability) -----------------------------------------------
def decodability_figure(records: list[dict]) -> Figure:
    """Decodability per layer at the latest evaluation, against its baselines (bootstrap interval,
    label-permutation band, chance), by shot when measured, and per layer over training."""
    last = records[-1]
    n_layers = len(last["cd"])
    layers = list(range(n_layers))
    by_shot = bool(last.get("cd_by_shot"))
    ratios = [1.2, 1.2, 1.6] if by_shot else [1.2, 1.6]
    fig, axes = _figure((4.2 * len(ratios), 3.8), 1, len(ratios), gridspec_kw={"width_ratios": ratios})
    ax = axes[0]
    cd = torch.tensor(last["cd"])
    if last.get("cd_interval"):
        interval = torch.tensor(last["cd_interval"])
        ax.errorbar(layers, cd, yerr=torch.stack([cd - interval[:, 0], interval[:, 1] - cd]).clamp_min(0),
                    fmt="o-", capsize=3, label="kNN, 95% bootstrap interval")  # fmt: skip
    else:
        ax.plot(layers, cd, "o-", label="kNN")
    if last.get("probe"):
        ax.plot(layers, last["probe"], "s--", label="ridge probe (held out)")
    if last.get("cd_permutation_high"):
        ax.fill_between(layers, last["cd_permutation"], last["cd_permutation_high"], color="grey", alpha=0.3,
                        step="mid", label="shuffled labels (mean to 95%)")  # fmt: skip
    chance = last.get("chance", 1 / len(last["concepts"]) if last.get("concepts") else None)
    if chance is not None:
        ax.axhline(chance, color="black", ls=":", lw=1, label=f"chance ({chance:.2g})")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("concept decodability")
    ax.set_title(f"step {last['step']}, {last['num_points']} points (k = {last.get('k', 10)})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    if by_shot:
        shots = axes[1]
        for layer, row in enumerate(last["cd_by_shot"]):
            shots.plot(range(len(row)), row, ".-", label=f"layer {layer}")
        if chance is not None:
            shots.axhline(chance, color="black", ls=":", lw=1, label="chance")
        shots.set_ylim(0, 1.02)
        shots.set_xlabel("shot (examples before the answer)")
        shots.xaxis.get_major_locator().set_params(integer=True)
        shots.set_ylabel("concept decodability")
        shots.set_title("by shot", fontsize=10)
        shots.legend(fontsize=7, loc="upper left")
        shots.grid(alpha=0.3)
    over = axes[-1]
    steps = [r["step"] for r in records]
    values = torch.tensor([r["cd"] for r in records]).T  # [L, evaluations]
    draw_heatmap(over, values, "over training", "concept decodability", "layer", "optimizer step", vmin=0.0, vmax=1.0)
    every = max(1, len(steps) // 12)
    over.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]], rotation=45, fontsize=7)
    fig.suptitle("concept decodability (leave-one-out kNN over the residual stream before the last answer)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig


# ---- circuit overlap (CircuitOverlap) ---------------------------------------------------------
def draw_jaccard(ax: Axes, record: dict) -> None:
    """The families' pairwise Jaccard matrix of a ``CircuitOverlap`` record on ``ax``."""
    names = record["families"]
    title = f"Jaccard of top {record['top_fraction']:.0%} heads (step {record['step']})"
    draw_heatmap(ax, record["jaccard"], title, "Jaccard index", "", "", vmin=0, vmax=1, annotate=False,
                 aspect="equal", title_size=9)  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)


def circuits_figure(record: dict) -> Figure:
    """A ``CircuitOverlap`` record: the families' Jaccard matrix, and how many families' circuits hold each head."""
    names = record["families"]
    n_l, n_h = torch.tensor(record["effects"][names[0]]).shape
    membership = torch.zeros(n_l, n_h)
    for heads in record["top_heads"].values():
        for layer, head in heads:
            membership[layer, head] += 1
    fig, (left, right) = _figure((4.0 + 0.4 * len(names) + 0.5 * n_h, 3.6), 1, 2)
    draw_jaccard(left, record)
    draw_heatmap(right, membership, f"families whose circuit holds the head (step {record['step']})",
                 "number of families", vmin=0, vmax=len(names), cmap="magma", annotate=False, aspect="equal",
                 title_size=9)  # fmt: skip
    fig.tight_layout()
    return fig


def circuits_over_training_figure(records: list[dict]) -> Figure:
    """The latest Jaccard matrix of the families' head sets, and pairwise Jaccard over training."""
    last = records[-1]
    names = last["families"]
    fig, (left, right) = _figure((10, 3.8), 1, 2)
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
    fig.tight_layout()
    return fig


# ---- concept patching (ConceptPatching) -------------------------------------------------------
def patching_figure(record: dict) -> Figure:
    """Loss at the last answer with each layer's concept patched, and the function-vector
    indirect effect of every head (when measured) on a scale centred on zero."""
    layers = record["layers"]
    has_fv = "fv_effect" in record
    fig, axes = _figure((10 if has_fv else 5, 3.8), 1, 2 if has_fv else 1, squeeze=False)
    ax = axes[0, 0]
    ax.axhline(record["loss/clean"], color="black", lw=1, label="clean")
    ax.plot(layers, record["loss/own"], "o-", label="own concept patched")
    ax.plot(layers, record["loss/other"], "s-", label="other concept patched")
    if "loss/zero_shot" in record:
        ax.axhline(record["loss/zero_shot"], color="grey", ls="--", lw=1, label="zero-shot")
        ax.plot(layers, record["loss/zero_shot_patched"], "^-", label="zero-shot, own concept patched")
    ax.set_xlabel("layer patched")
    ax.set_ylabel("loss at the last answer")
    ax.set_xticks(layers)
    ax.set_title(f"concept patching at the final query (step {record['step']})", fontsize=9)
    ax.legend(fontsize=7)
    if has_fv:
        label = "p(answer) gained" if "prob/clean" in record else "loss removed"
        draw_heatmap(axes[0, 1], record["fv_effect"], "function-vector indirect effect (shuffled answers)", label,
                     symmetric=True, annotate=False, aspect="equal", title_size=9)  # fmt: skip
    fig.tight_layout()
    return fig


# ---- subnetworks (lightning-icl core) ---------------------------------------------------------
def keep_frequency_figure(summary: dict) -> Figure:
    """Heatmap of the keep frequency ``[L, H]`` over the subnetworks; core heads are outlined."""
    from matplotlib.patches import Rectangle

    freq = torch.tensor(summary["frequency"])
    n_l, n_h = freq.shape
    fig, ax = _figure((max(5.0, 2.0 + 0.8 * n_h), 2.0 + 0.6 * n_l))
    title = f"Head keep frequency over {len(summary['runs'])} subnetworks\n(heuristic core outlined)"
    draw_heatmap(ax, freq, title, "fraction keeping the head", vmin=0, vmax=1, annotate=False)
    for layer in range(n_l):
        for head in range(n_h):
            value = float(freq[layer, head])
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.5 else "white")
    for layer, head in summary["core"]:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.tight_layout()
    return fig


# ---- training and per-shot curves (ICLModule, ICLCurves) --------------------------------------
def training_curves_figure(series: dict[str, list[tuple[int, float]]], chance: float | None = None) -> Figure | None:
    """Train loss and every evaluation metric over steps (``metrics.csv`` series), one panel per
    metric kind (accuracy on [0, 1], with the chance of guessing the answer when ``chance`` is given)."""
    kinds = {"loss": [], "acc": [], "mse": []}
    for key in series:
        base = key.split("/")[-1]
        if base in kinds:
            kinds[base].append(key)
    panels = [(k, keys) for k, keys in kinds.items() if keys]
    if not panels:
        return None
    fig, axes = _figure((6 * len(panels), 4.2), 1, len(panels), squeeze=False)
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
    return fig


def icl_curves_figure(
    rows: list[dict], stage: str = "val", max_steps_shown: int = 4, chance: float | None = None
) -> Figure | None:
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
    fig, axes = _figure((4.2 * len(splits), 3.4 * len(metrics)), len(metrics), len(splits), squeeze=False,
                        sharey="row")  # fmt: skip
    cmap = _colormap("viridis")
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
    return fig


def concept_curves_figure(records: list[dict]) -> Figure | None:
    """Per-concept loss of ``ICLCurves`` records: per shot at the last evaluation, and at the last
    shot over training (``None`` when no split has per-concept curves)."""
    last = records[-1]
    split = next((name for name, c in last["splits"].items() if c.get("loss_by_concept")), None)
    if split is None:
        return None
    concepts = list(last["splits"][split]["loss_by_concept"])
    fig, (left, right) = _figure((10, 3.8), 1, 2)
    cmap = _colormap("tab10" if len(concepts) <= 10 else "viridis")
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
    fig.tight_layout()
    return fig


# ---- sweeps (lightning-icl report over several runs) -----------------------------------------
def _phase_cells(points: list[tuple[float, float, float]]) -> tuple[list[float], list[float], dict]:
    """The grid's x and y values and ``{(row, column): [values of the runs there]}``."""
    xs = sorted({p[0] for p in points})
    ys = sorted({p[1] for p in points})
    cells: dict[tuple[int, int], list[float]] = {}
    for px, py, value in points:
        cells.setdefault((ys.index(py), xs.index(px)), []).append(value)
    return xs, ys, cells


def _draw_phase(ax: Axes, points: list[tuple[float, float, float]], x: str, y: str, title: str) -> None:
    xs, ys, cells = _phase_cells(points)
    grid = torch.full((len(ys), len(xs)), float("nan"))
    for (i, j), values in cells.items():
        grid[i, j] = sum(values) / len(values)
    draw_heatmap(ax, grid, title, "final value", y, x, vmin=0, vmax=max(1.0, float(grid.nan_to_num().max())),
                 cmap="magma", annotate=False, aspect="equal", title_size=9)  # fmt: skip
    ax.invert_yaxis()  # the lowest y at the bottom
    ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
    ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
    for (i, j), values in cells.items():
        mean = sum(values) / len(values)
        text = f"{mean:.2f}"
        if len(values) > 1:
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            text += f"\n±{std:.2f} ({len(values)})"
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if mean < 0.6 else "black")


def phase_diagram_figure(
    points: list[tuple[float, float, float]] | dict[str, list[tuple[float, float, float]]],
    x: str,
    y: str,
    metric: str | None = None,
) -> Figure:
    """Final metrics over a grid of two hyperparameters, one cell per ``(x, y)``: the mean over the
    runs there (seeds), written with its spread (``± std (n runs)``) where several runs share a
    cell. ``points`` is one metric's ``[(x, y, value)]`` (named by ``metric``) or ``{metric: points}``,
    one panel each."""
    by_metric = {metric or "metric": points} if isinstance(points, list) else dict(points)
    xs = sorted({p[0] for pts in by_metric.values() for p in pts})
    ys = sorted({p[1] for pts in by_metric.values() for p in pts})
    n = len(by_metric)
    fig, axes = _figure(((2.0 + 1.0 * len(xs)) * n, 1.8 + 0.7 * len(ys)), 1, n, squeeze=False)
    for ax, (name, pts) in zip(axes[0], by_metric.items(), strict=True):
        seeds = max(len(v) for v in _phase_cells(pts)[2].values())
        title = f"{name} (final)" + (f", mean of up to {seeds} runs" if seeds > 1 else "")
        _draw_phase(ax, pts, x, y, title)
    fig.tight_layout()
    return fig


def phase_lines_figure(
    by_metric: dict[str, list[tuple[float, float, float]]], x: str, y: str, chance: float | None = None
) -> Figure:
    """The same sweep as lines: each metric's final value against ``x``, one line per ``y`` (the
    mean over the runs at a point, a bar from the lowest to the highest), one panel per metric.
    ``x`` is drawn on a log2 scale when it spans a factor of 8 or more (n_i.d. doubling)."""
    n = len(by_metric)
    fig, axes = _figure((4.0 * n, 3.6), 1, n, squeeze=False, sharey=True)
    for ax, (name, pts) in zip(axes[0], by_metric.items(), strict=True):
        xs, ys, cells = _phase_cells(pts)
        for i, yv in enumerate(ys):
            row = [(xs[j], cells[(i, j)]) for j in range(len(xs)) if (i, j) in cells]
            means = [sum(v) / len(v) for _, v in row]
            line = ax.plot([px for px, _ in row], means, marker="o", label=f"{y} = {yv:g}")[0]
            for px, values in row:
                if len(values) > 1:
                    ax.vlines(px, min(values), max(values), color=line.get_color(), alpha=0.5)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.2f}")
        if xs and xs[0] > 0 and xs[-1] / xs[0] >= 8:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(x)
        if name.split("/")[-1].startswith("acc"):
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final value")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def seed_bands_figure(series: dict[str, dict[str, list[dict[int, float]]]]) -> Figure | None:
    """One panel per evaluation metric (``series``: name -> group label -> one ``{step: value}``
    per seed): each group's mean over its seeds with a band from the lowest to the highest seed."""
    if not series:
        return None
    fig, axes = _figure((4.6 * len(series), 3.8), 1, len(series), squeeze=False, sharey=True)
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
    fig.tight_layout()
    return fig


def peak_figure(history: list[dict]) -> Figure | None:
    """A monitored metric over training (``OODPeakCheckpoint`` records), its peak marked and the
    last value labelled: how far the run fell from its peak."""
    points = [(r["step"], r["value"]) for r in history if r["value"] is not None and math.isfinite(r["value"])]
    if not points:
        return None
    last = history[-1]
    fig, ax = _figure((6.0, 3.8))
    steps, values = zip(*points, strict=True)
    ax.plot(steps, values, marker="o", markersize=3, label=last["monitor"])
    if last["peak_step"] is not None:
        ax.plot([last["peak_step"]], [last["peak_value"]], marker="*", markersize=14, color="C3", linestyle="none",
                label=f"peak {last['peak_value']:.3f} at step {last['peak_step']} (checkpoint kept)")  # fmt: skip
        ax.axvline(last["peak_step"], color="C3", alpha=0.3, linestyle="--")
    ax.set_title(f"{last['monitor']}: last {last['value']:.3f} at step {last['step']}", fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(
        METRIC_LABELS.get(last["monitor"].split("/")[-1].removesuffix("_last").removesuffix("_shot0"), "value")
    )
    if last["monitor"].split("/")[-1].startswith("acc"):
        ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
