"""The benchmark scripts run end to end (tiny shapes) and write their tables; no timing is asserted."""

import csv
import os

import pytest

from benchmarks import samplers
from benchmarks.kernels import attention


@pytest.mark.slow
def test_attention_benchmark_writes_its_tables(tmp_path):
    providers = "kernel,kernel+all,reference+all,sdpa_flash,eager+stats"
    if os.environ.get("TRITON_INTERPRET") != "1":
        providers = "reference+all,eager+stats"
    rows = attention.main(["--quick", "--device=cpu", f"--providers={providers}", f"--out={tmp_path}"])
    with open(tmp_path / "attention_cpu_quick.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) == 2 * 3 * len(providers.split(","))  # 2 lengths x 3 modes
    assert {r["provider"] for r in written} == set(providers.split(","))
    md = (tmp_path / "attention_cpu_quick.md").read_text()
    assert "torch:" in md and "gpu:" in md and "vs eager+stats" in md


def test_sampler_benchmark_writes_its_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "sys.argv",
        ["samplers", "--seconds=0.05", "--model-steps=1", "--model-batch=2", "--device=cpu", f"--out={tmp_path}"],
    )
    monkeypatch.setattr(samplers, "SETUPS", {k: v for k, v in samplers.SETUPS.items() if "quickstart" in k})
    samplers.main()
    with open(tmp_path / "samplers_cpu.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["setup"] == "quickstart modular p=7" and float(row["sampler seq/s"].replace(",", "")) > 0


@pytest.mark.slow
def test_capture_benchmark_writes_its_tables_and_goals(tmp_path):
    from benchmarks import capture

    rows = capture.main(["--quick", "--device=cpu", f"--out={tmp_path}"])
    with open(tmp_path / "capture_cpu_quick.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and {r["section"] for r in written} == {"model", "attention", "train"}
    providers = {r["provider"] for r in written if r["section"] == "model"}
    assert {"no capture", "capture@answers", "capture@last", "capture@all"} <= providers
    # every model row carries its time relative to the forward without capture
    assert all(float(r["vs baseline"]) > 0 for r in written if r["section"] == "model")
    md = (tmp_path / "capture_cpu_quick.md").read_text()
    assert "## Goals" in md and "torch:" in md
    # the CPU goal is judged in every run; the GPU goals say that they need CUDA
    assert "faster than TransformerLens" in md and "need CUDA" in md and "needs CUDA" in md


def test_capture_benchmark_stops_starting_rows_when_its_budget_is_spent(tmp_path):
    from benchmarks import capture

    rows = capture.main(["--quick", "--device=cpu", "--budget=0", f"--out={tmp_path}"])
    assert rows == []
