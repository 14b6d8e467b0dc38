"""Shared helpers for the benchmarks: environment description and table writing."""

from __future__ import annotations

import csv
import datetime
import os
import platform

import torch


def environment() -> dict[str, str]:
    """Machine, GPU and library versions, for the header of every results table."""
    import lightning
    import torchmetrics

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores ({cpu})",
        "torch threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
    }


def write_tables(rows: list[dict], out_dir: str, stem: str, title: str, notes: str = "") -> tuple[str, str]:
    """Write ``rows`` as ``<stem>.csv`` and ``<stem>.md`` (with the environment) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path = os.path.join(out_dir, f"{stem}.csv"), os.path.join(out_dir, f"{stem}.md")
    keys = list(rows[0])
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in environment().items()]
    lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path
