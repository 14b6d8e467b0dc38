"""The files a run writes and reads back: strict JSON lines, ``metrics.csv``, and runs that span
several logger versions (a run resumed from a checkpoint writes into a new ``version_N``).

Every record file is JSON lines in strict JSON: a non-finite number is written ``null``. A
reader skips a truncated last line (a process killed while writing one) and says so; a broken
line anywhere else is an error naming the file and the line.

A run's identity travels with its checkpoints: the first fit draws a ``run_id``, every
checkpoint carries it, and every fit writes ``run.json`` (``run_id`` and the step it started
from) into its log directory. :func:`run_segments` groups version directories of one run, and
:func:`merge_segments` joins them into one directory whose records read as one uninterrupted
run: each segment's records after the step the next segment resumed from are dropped (that
timeline died with its process), and where two segments hold the same step the later one wins.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import uuid
import warnings
from collections import defaultdict
from typing import Any

RUN_FILE = "run.json"
CHECKPOINT_KEY = "lightning_icl"
"""Where a checkpoint keeps what the package adds to it (the run's identity, the digest)."""


# ---- strict JSON lines ----------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (tuples become lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(record: dict) -> str:
    """One strict-JSON line (no ``NaN``/``Infinity``: those become ``null``)."""
    return json.dumps(json_safe(record), allow_nan=False)


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write ``records`` afresh: to a temporary file beside ``path``, then renamed over it, so a
    reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for record in records:
            f.write(dumps(record) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(dumps(record) + "\n")


def write_history(path: str, history: list[dict], started: bool) -> None:
    """A run's records file: written afresh from the whole ``history`` at the run's first record
    (a resumed run's file then holds its restored records, and a run never appends to another
    run's file), the latest record appended after that (``started``)."""
    if started:
        append_jsonl(path, history[-1])
    else:
        write_jsonl(path, history)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file; a truncated last line is skipped with a warning.

    Raises ``ValueError`` naming the file and line when any other line is not JSON.
    """
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == last and i == len(lines) - 1:  # no newline after it: cut off while being written
                warnings.warn(f"{path}: skipped its last line, cut off while being written", stacklevel=2)
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({err.msg})") from None
    return records


# ---- metrics.csv ----------------------------------------------------------------------------
def read_metrics_csv(path: str) -> dict[str, list[tuple[int, float]]]:
    """``metric -> [(step, value), ...]`` from a CSVLogger ``metrics.csv`` (empty or unreadable
    cells, as a killed process leaves in its last row, are skipped)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or 0))
            except ValueError:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or key is None or value in (None, ""):
                    continue
                try:
                    series[key].append((step, float(value)))
                except (TypeError, ValueError):
                    continue
    return dict(series)


def write_metrics_csv(path: str, series: dict[str, list[tuple[int, float]]]) -> None:
    """The inverse of :func:`read_metrics_csv`: one row per step, one column per metric."""
    rows: dict[int, dict[str, float]] = defaultdict(dict)
    for key, values in series.items():
        for step, value in values:
            rows[step][key] = value
    keys = sorted(series)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *keys])
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow({"step": step, **rows[step]})


# ---- a run's identity -----------------------------------------------------------------------
def run_id(trainer) -> str:
    """The identity of the run ``trainer`` fits: drawn at the first fit, restored from a checkpoint."""
    rid = getattr(trainer, "_lightning_icl_run_id", None)
    if rid is None:
        rid = uuid.uuid4().hex[:16]
        trainer._lightning_icl_run_id = rid
    return rid


def save_run_id(trainer, checkpoint: dict) -> None:
    checkpoint.setdefault(CHECKPOINT_KEY, {})["run_id"] = run_id(trainer)


def load_run_id(trainer, checkpoint: dict) -> None:
    rid = checkpoint.get(CHECKPOINT_KEY, {}).get("run_id")
    if rid is not None:
        trainer._lightning_icl_run_id = rid


def write_run_file(trainer, log_dir: str | None) -> None:
    """``<log_dir>/run.json``: the run's identity and the step this fit started from (rank 0, once per fit)."""
    if log_dir is None or not trainer.is_global_zero or getattr(trainer, "_lightning_icl_run_written", False):
        return
    trainer._lightning_icl_run_written = True
    os.makedirs(log_dir, exist_ok=True)
    ckpt = None if trainer.ckpt_path is None else str(trainer.ckpt_path)
    info = {"run_id": run_id(trainer), "start_step": trainer.global_step, "resumed_from": ckpt}
    with open(os.path.join(log_dir, RUN_FILE), "w") as f:
        json.dump(info, f)


def read_run_file(directory: str) -> dict | None:
    path = os.path.join(directory, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) and "run_id" in info else None


# ---- runs that span several version directories ------------------------------------------------
def is_run_dir(path: str) -> bool:
    """Whether ``path`` holds a run's files (as opposed to a logger folder of ``version_N`` runs)."""
    names = ("metrics.csv", "hparams.yaml", "config.yaml", RUN_FILE, "core.json")
    return any(os.path.exists(os.path.join(path, n)) for n in names) or bool(glob.glob(os.path.join(path, "*.jsonl")))


def expand_run_dirs(paths: list[str]) -> list[str]:
    """Each path as given, or, for a logger folder (``runs/quickstart``), its ``version_N`` folders in order."""
    out = []
    for path in paths:
        versions = sorted(
            (d for d in glob.glob(os.path.join(path, "version_*")) if os.path.isdir(d)),
            key=lambda d: int(d.rsplit("_", 1)[1]) if d.rsplit("_", 1)[1].isdigit() else 1 << 30,
        )
        out.extend(versions if versions and not is_run_dir(path) else [path])
    return out


def run_segments(run_dirs: list[str]) -> list[list[str]]:
    """``run_dirs`` grouped into runs: directories whose ``run.json`` share a ``run_id`` (and whose
    ``hparams.yaml`` agree) are the segments of one resumed run, ordered by the step each started
    from; every other directory is a run of its own. Runs keep the order in which they first appear."""
    groups: dict[str, list[str]] = {}
    for d in run_dirs:
        info = read_run_file(d)
        same = ""  # a copy of a run given other settings is another run
        if os.path.exists(hparams := os.path.join(d, "hparams.yaml")):
            with open(hparams) as f:
                same = f.read()
        key = f"run:{info['run_id']}:{same}" if info else f"dir:{d}"
        groups.setdefault(key, []).append(d)
    return [sorted(dirs, key=lambda d: (read_run_file(d) or {}).get("start_step", 0) or 0) for dirs in groups.values()]


def _record_key(record: dict) -> tuple:
    return (record.get("step"), record.get("stage"), record.get("split"), record.get("metric"))


def merge_segments(segments: list[str], out: str) -> str:
    """Join the version directories of one resumed run into ``out``, as one run's files (see the
    module docstring). Returns ``out``; a single segment is returned as it is."""
    if len(segments) == 1:
        return segments[0]
    os.makedirs(out, exist_ok=True)
    starts = [(read_run_file(d) or {}).get("start_step", 0) or 0 for d in segments]
    ends = [*starts[1:], math.inf]  # a segment's records count up to where the next one resumed
    series: dict[str, dict[int, float]] = defaultdict(dict)
    records: dict[str, dict[tuple, dict]] = defaultdict(dict)
    for directory, end in zip(segments, ends, strict=True):
        metrics = os.path.join(directory, "metrics.csv")
        if os.path.exists(metrics):
            for key, values in read_metrics_csv(metrics).items():
                for step, value in values:
                    if step <= end:
                        series[key][step] = value
        for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
            name = os.path.basename(path)
            for record in read_jsonl(path):
                if (record.get("step") or 0) <= end:
                    records[name][_record_key(record)] = record
        for name in ("hparams.yaml", "config.yaml", "core.json", RUN_FILE):
            src = os.path.join(directory, name)
            if os.path.exists(src):
                with open(src) as f, open(os.path.join(out, name), "w") as g:
                    g.write(f.read())
    if series:
        write_metrics_csv(os.path.join(out, "metrics.csv"), {k: sorted(v.items()) for k, v in series.items()})
    for name, by_key in records.items():
        ordered = sorted(by_key.values(), key=lambda r: r.get("step") or 0)
        write_jsonl(os.path.join(out, name), ordered)
    with open(os.path.join(out, "segments.txt"), "w") as f:
        f.write("\n".join(f"{d}\tfrom step {s}" for d, s in zip(segments, starts, strict=True)) + "\n")
    return out
