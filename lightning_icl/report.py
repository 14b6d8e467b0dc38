"""Reports of runs: the figures written after ``fit``, and ``lightning-icl report``, figures and
one self-contained HTML page from run directories. The drawing is :mod:`lightning_icl.plotting`'s.

At the end of ``lightning-icl fit``, :func:`write_fit_report` writes ``training_curves.png`` and
``icl_curves.png`` into the log directory and, through :func:`write_report`, the run's HTML page
into its ``report/`` folder; :func:`fit_summary` says in a few lines what the run found.

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
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

import yaml

from lightning_icl import plotting
from lightning_icl.records import expand_run_dirs, merge_segments, read_jsonl, read_metrics_csv, run_segments

if TYPE_CHECKING:
    from lightning_icl.plotting import Figure

PHASE_METRICS = tuple(f"val/{split}/acc_last" for split in ("id_seen", "id_unseen", "ood_seen", "ood_unseen"))
"""What ``--phase`` draws by default: He et al.'s four splits' last-shot accuracy (those a sweep logged)."""


# ---- hyperparameters --------------------------------------------------------------------------
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


# ---- the figures after fit ------------------------------------------------------------------
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


FIT_FIGURES = {"training.png": "training_curves.png", "per_shot.png": "icl_curves.png"}
"""The report's figures a fit also keeps in its log directory, under these names."""


def write_fit_report(log_dir: str, html: bool = False) -> list[str]:
    """Write ``training_curves.png`` and ``icl_curves.png`` into ``log_dir``, and with ``html`` the
    run's page, ``log_dir/report/index.html`` (its figures drawn once: the two are copies of the
    report's own); return the paths written.

    The per-shot curves come from the module's ``icl_curves.jsonl``, or, where there is none,
    from an ``ICLCurves`` callback's ``curves.jsonl``.
    """
    if html:
        report = os.path.join(log_dir, "report")
        index = write_report([log_dir], report)
        written = []
        for name, kept in FIT_FIGURES.items():
            if os.path.exists(os.path.join(report, name)):
                written.append(shutil.copyfile(os.path.join(report, name), os.path.join(log_dir, kept)))
        return [*written, index]
    written = []
    chance = answer_chance(hyperparameters(log_dir))
    metrics = os.path.join(log_dir, "metrics.csv")
    if os.path.exists(metrics):
        fig = plotting.training_curves_figure(read_metrics_csv(metrics), chance)
        written.append(plotting.save(fig, os.path.join(log_dir, "training_curves.png"), plotting.CURVES_DPI))
    rows = per_shot_rows(log_dir)
    if rows:
        fig = plotting.icl_curves_figure(rows, chance=chance)
        written.append(plotting.save(fig, os.path.join(log_dir, "icl_curves.png"), plotting.CURVES_DPI))
    return [path for path in written if path]


def per_shot_rows(log_dir: str) -> list[dict]:
    """Per-shot curves of a run: ``icl_curves.jsonl``, else ``curves.jsonl`` (the ``ICLCurves`` callback)."""
    curves = os.path.join(log_dir, "icl_curves.jsonl")
    if os.path.exists(curves):
        return read_jsonl(curves)
    callback = os.path.join(log_dir, "curves.jsonl")
    return curves_as_rows(read_jsonl(callback)) if os.path.exists(callback) else []


# ---- the summary after fit -------------------------------------------------------------------
SUMMARY_SPLITS = ("id_seen", "ood_unseen")
"""The splits the accuracy line names when a run has them (He et al.'s easiest and hardest)."""


def callback_histories(callbacks: Sequence) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """The records of a Trainer's interpretability callbacks, ``key -> history`` (``ablation``,
    ``decodability_<tag>``, ...), and the seconds each spent measuring, ``class name -> seconds``."""
    from lightning_icl.callbacks import ICLCallback

    histories: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for callback in callbacks:
        if isinstance(callback, ICLCallback) and (callback.history or callback.seconds):  # those that ran
            if callback.history:
                histories[callback.key] = callback.history
            name = type(callback).__name__
            seconds[name] = seconds.get(name, 0.0) + callback.seconds
    return histories, seconds


def fit_summary(
    last_eval: dict[str, float],
    histories: dict[str, list[dict]],
    seconds: dict[str, float] | None = None,
    fit_seconds: float | None = None,
) -> list[str]:
    """What a fit found, one short line per finding that has data, in this order:

    - first- vs last-shot accuracy (squared error on vector tasks) on ``id_seen`` and ``ood_unseen``,
      from the module's final evaluation ``last_eval`` (``val/<split>/acc_shot0``, ``..._last``);
    - the head whose ablation raises the loss most (the last ``ablation`` record) and where head
      attribution (the last ``attribution`` record) ranks it;
    - the layer that decodes the concept best (the last ``decodability`` record), against its
      shuffled-label baseline and chance, and how it grows from the first shot;
    - the heads that attend most to each token class, and the previous-token head (``attention``);
    - ``seconds`` (callback -> seconds spent measuring) against the whole fit's ``fit_seconds``.

    ``histories`` maps a callback's key to its records: :func:`callback_histories` of a Trainer's
    callbacks, or :func:`callback_records` of a run directory. A line is left out when its data is.
    """
    lines = [_accuracy_line(last_eval), _head_line(histories), _decodability_line(histories)]
    lines += [_attention_line(histories), _cost_line(seconds or {}, fit_seconds)]
    return [line for line in lines if line]


def _latest(histories: dict[str, list[dict]], name: str) -> dict | None:
    """The last record of the callback ``name`` (its untagged one first, else the first tagged one)."""
    keys = sorted((k for k in histories if k == name or k.startswith(f"{name}_")), key=lambda k: k != name)
    return histories[keys[0]][-1] if keys and histories[keys[0]] else None


def _top(per_head: list[list[float]], pick=max) -> tuple[str, float, int, list[float]]:
    """The head ``pick`` chooses in a ``[L][H]`` table (a missing value never): its name (``L1H2``),
    value and flat index, and every value flat."""
    flat = [v for row in per_head for v in row]
    worst = -math.inf if pick is max else math.inf
    i = pick(range(len(flat)), key=lambda j: flat[j] if flat[j] is not None and math.isfinite(flat[j]) else worst)
    return f"L{i // len(per_head[0])}H{i % len(per_head[0])}", flat[i], i, flat


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _accuracy_line(last_eval: dict[str, float]) -> str | None:
    for metric, title in (("acc", "accuracy"), ("mse", "squared error")):
        found = {}  # split -> (first shot, last shot)
        for key, last in last_eval.items():
            head, _, tail = key.rpartition("/")
            stage, _, split = head.partition("/")
            if tail == f"{metric}_last" and stage in ("val", "test") and f"{head}/{metric}_shot0" in last_eval:
                found.setdefault(split, (last_eval[f"{head}/{metric}_shot0"], last))
        if found:
            splits = [s for s in SUMMARY_SPLITS if s in found] or list(found)[:2]
            shown = ", ".join(f"{s} {found[s][0]:.2f} -> {found[s][1]:.2f}" for s in splits)
            return f"{title}, first -> last shot: {shown}"
    return None


def _head_line(histories: dict[str, list[dict]]) -> str | None:
    ablation, attribution = _latest(histories, "ablation"), _latest(histories, "attribution")
    if ablation is None:
        if attribution is None:
            return None
        head, value, _, _ = _top(attribution["loss_effect_estimate"])
        return f"most important head by attribution: {head} (estimated loss effect {value:+.3f})"
    head, value, index, _ = _top(ablation["loss_effect"])
    line = f"most important head {head} ({ablation.get('mode', 'zero')} ablation: loss {value:+.3f})"
    if attribution is not None:
        estimate = _top(attribution["loss_effect_estimate"])[3]
        mine = estimate[index]
        if mine is not None:
            rank = 1 + sum(v is not None and v > mine for v in estimate)
            line += f"; attribution ranks it {_ordinal(rank)} of {len(estimate)}"
        agreements = [r["rank_agreement"] for r in (attribution, ablation) if r.get("rank_agreement") is not None]
        if agreements and attribution["step"] == ablation["step"]:  # measured on the same model
            line += f" (Spearman {agreements[0]:.2f})"
    return line


def _decodability_line(histories: dict[str, list[dict]]) -> str | None:
    record = _latest(histories, "decodability")
    if record is None:
        return None
    layer = record["peak_layer"]
    line = f"concept decodability peaks at layer {layer}: {record['peak']:.2f}"
    against = []  # what the same points reach without concept information
    if record.get("cd_permutation_high"):
        against.append(f"shuffled labels {record['cd_permutation_high'][layer]:.2f}")
    if record.get("chance") is not None:
        against.append(f"chance {record['chance']:.2f}")
    if against:
        line += f" ({', '.join(against)})"
    by_shot = record.get("cd_by_shot")  # [L][shots]: the last shot is the peak's own value
    if by_shot and len(by_shot[layer]) > 1:
        line += f"; {by_shot[layer][0]:.2f} at the first shot"
    return line


def _attention_line(histories: dict[str, list[dict]]) -> str | None:
    record = _latest(histories, "attention")
    if record is None:
        return None
    parts = []
    mass = record.get("class_mass")  # [L][H][C]
    if mass:
        names = record.get("class_names") or [f"class{c}" for c in range(len(mass[0][0]))]
        tops = [(name, *_top([[head[c] for head in layer] for layer in mass])[:2]) for c, name in enumerate(names)]
        parts.append("most mass on " + ", ".join(f"{name} {head} ({value:.2f})" for name, head, value in tops))
    if record.get("previous_token"):
        head, value, _, _ = _top(record["previous_token"])
        parts.append(f"previous-token head {head} ({value:.2f})")
    if not parts and record.get("entropy"):
        head, value, _, _ = _top(record["entropy"], min)
        parts.append(f"sharpest head {head} (entropy {value:.2f} nats)")
    return f"attention: {'; '.join(parts)}" if parts else None


def _cost_line(seconds: dict[str, float], fit_seconds: float | None) -> str | None:
    if not seconds:
        return None
    total = sum(seconds.values())
    line = f"callbacks: {total:.1f} s"
    if fit_seconds:
        line += f" of {fit_seconds:.1f} s ({100 * total / fit_seconds:.1f}%)"
    name = max(seconds, key=seconds.__getitem__)
    if len(seconds) > 1 and seconds[name] > 0:
        line += f", most in {name} ({seconds[name]:.1f} s)"
    return line


# ---- sweeps ----------------------------------------------------------------------------------
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


def seed_series(groups: dict[str, list[str]]) -> dict[str, dict[str, list[dict[int, float]]]]:
    """Each evaluation split's accuracy (or squared error) over training, per group and seed:
    ``"<split> <metric>" -> group label -> [{step: value} per run]`` (from ``metrics.csv``)."""
    series: dict[str, dict[str, list[dict[int, float]]]] = {}
    for label, runs in groups.items():
        for run_dir in runs:
            path = os.path.join(run_dir, "metrics.csv")
            if not os.path.exists(path):
                continue
            for key, values in read_metrics_csv(path).items():
                parts = key.split("/")
                if len(parts) == 3 and parts[0] == "val" and parts[2] in ("acc", "mse"):
                    series.setdefault(f"{parts[1]} {parts[2]}", {}).setdefault(label, []).append(dict(values))
    return series


# ---- the report -------------------------------------------------------------------------------
def run_figures(run_dir: str, out: str, prefix: str = "") -> list[tuple[str, str]]:
    """Every figure ``run_dir`` has data for, written into ``out``; ``[(title, path), ...]``."""
    figures: list[tuple[str, str]] = []

    def add(title: str, fig: Figure | None, name: str, dpi: float = plotting.DPI, **savefig) -> None:
        path = plotting.save(fig, os.path.join(out, f"{prefix}{name}.png"), dpi, **savefig)
        if path:
            figures.append((title, path))

    chance = answer_chance(hyperparameters(run_dir))
    metrics = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(metrics):
        fig = plotting.training_curves_figure(read_metrics_csv(metrics), chance)
        add("Loss and accuracy per split", fig, "training", plotting.CURVES_DPI)
    rows = per_shot_rows(run_dir)
    if rows:
        fig = plotting.icl_curves_figure(rows, chance=chance)
        add("Per-shot curves at several steps", fig, "per_shot", plotting.CURVES_DPI)
    for stem, records in callback_records(run_dir, "curves").items():
        add(f"Per-concept curves ({stem})", plotting.concept_curves_figure(records), f"{stem}_by_concept")
    for stem, records in callback_records(run_dir, "ood_peak").items():
        add(f"Peak of {records[-1]['monitor']} (its checkpoint kept)", plotting.peak_figure(records), stem,
            plotting.CURVES_DPI)  # fmt: skip
    for stem, records in callback_records(run_dir, "decodability").items():
        add(f"Concept decodability ({stem})", plotting.decodability_figure(records), stem)
    ablation = callback_records(run_dir, "ablation")
    attribution = callback_records(run_dir, "attribution")
    if ablation or attribution:
        last = lambda found: next(iter(found.values()))[-1] if found else None
        fig = plotting.head_importance_figure(last(ablation), last(attribution))
        add("Head importance: ablation and attribution", fig, "heads", plotting.CURVES_DPI, bbox_inches="tight")
    for stem, records in callback_records(run_dir, "attention").items():
        add(f"Attention statistics ({stem})", plotting.attention_figure(records[-1]), stem)
    for stem, records in callback_records(run_dir, "circuits").items():
        add(f"Circuit overlap ({stem})", plotting.circuits_over_training_figure(records), stem)
    for stem, records in callback_records(run_dir, "patching").items():
        add(f"Concept patching and function-vector heads ({stem})", plotting.patching_figure(records[-1]), stem)
    core = os.path.join(run_dir, "core.json")
    if os.path.exists(core):
        with open(core) as f:
            fig = plotting.keep_frequency_figure(json.load(f))
        add("Subnetworks: head keep frequency", fig, "core", plotting.KEEP_FREQUENCY_DPI)
    return figures


def write_report(
    run_dirs: Sequence[str],
    out: str,
    phase: tuple[str, str] | None = None,
    metrics: str | Sequence[str] = PHASE_METRICS,
) -> str:
    """Figures for every run, a phase diagram over ``phase`` = (x, y) hyperparameters when several
    runs are given, and ``out/index.html`` showing them all (images embedded). Returns its path.

    The phase diagram has a panel per final metric of ``metrics`` that some run logged
    (``phase_diagram.png``, a grid; ``phase_lines.png``, each metric against x, a line per y)."""
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
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
    points: dict[str, list[tuple[float, float, float]]] = {m: [] for m in metrics}
    chances = set()
    many = len(run_dirs) > 1
    for i, (title, run_dir) in enumerate(tqdm(runs, desc="runs", unit="run", disable=not many)):
        prefix = f"run{i}_" if many else ""
        figures = run_figures(run_dir, out, prefix)
        finals = final_metrics(run_dir)
        sections.append((title, figures, finals, hyperparameters(run_dir)))
        if phase is not None:
            hp = hyperparameters(run_dir)
            if all(k in hp for k in phase):
                chances.add(answer_chance(hp))
                for m in metrics:
                    if m in finals:
                        points[m].append((float(hp[phase[0]]), float(hp[phase[1]]), finals[m]))
    summary: list[tuple[str, str]] = []
    if phase is not None:
        points = {m: pts for m, pts in points.items() if pts}
        if not points:
            raise ValueError(
                f"no run has both hyperparameters {phase} (hparams.yaml or config.yaml) and a final value of "
                f"any of {list(metrics)}"
            )
        names = ", ".join(points)
        fig = plotting.phase_diagram_figure(points, phase[0], phase[1])
        path = plotting.save(fig, os.path.join(out, "phase_diagram.png"))
        summary.append((f"Phase diagram: {names} over {phase[0]} x {phase[1]}", path))
        chance = chances.pop() if len(chances) == 1 else None
        fig = plotting.phase_lines_figure(points, phase[0], phase[1], chance)
        path = plotting.save(fig, os.path.join(out, "phase_lines.png"), plotting.CURVES_DPI)
        summary.append((f"The same sweep against {phase[0]}, a line per {phase[1]}", path))
    if many and (groups := seed_groups(run_dirs)):
        path = plotting.save(plotting.seed_bands_figure(seed_series(groups)), os.path.join(out, "seeds.png"))
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
    parser.add_argument(
        "--metric",
        default=",".join(PHASE_METRICS),
        help="final metrics of the phase diagram, separated by commas, a panel each (default: the last-shot "
        "accuracy of the four He et al. splits)",
    )
    args = parser.parse_args(argv)
    phase = None
    if args.phase is not None:
        phase = tuple(p.strip() for p in args.phase.split(","))
        if len(phase) != 2 or not all(phase):
            parser.error(f"--phase takes two hyperparameter names separated by a comma, got {args.phase!r}")
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    if not metrics:
        parser.error(f"--metric takes one or more metric names separated by commas, got {args.metric!r}")
    index = write_report(args.runs, args.out, phase, metrics)
    print(f"wrote {index}")
    return index
