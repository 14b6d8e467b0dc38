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


def test_capture_goals_judge_the_ratios_of_the_run():
    """The Goals lines compare the right rows: same shape, dtype and mode; the fastest SDPA backend."""
    from benchmarks.capture import goals, row

    def attention(provider, mode, ms, t=95, dtype="float16"):
        return row("attention", "he", provider, mode, T=t, dtype=dtype, ms=ms)

    rows = [
        attention("kernel", "fwd", 1.0),
        attention("kernel+all", "fwd", 1.08),
        attention("kernel", "fwd+bwd", 3.0),
        attention("kernel+all", "fwd+bwd", 3.3),  # 1.10 > 1.05: not met
        attention("sdpa:flash", "fwd+bwd", 3.3),
        attention("sdpa:cudnn", "fwd+bwd", 2.9),  # the fastest backend: 2.9 / 3.0 < 1
        attention("sdpa:flash", "fwd+bwd", 1.0, dtype="bfloat16"),  # another dtype: not compared
        row("train", "he2024", "sdpa", "step", ms=10.0),
        row("train", "he2024", "kernel+stats@answers", "step", ms=9.0),
    ]
    lines = {line.split(":")[0]: line for line in goals(rows, "cuda")}
    assert "not met; he: 0.97 vs sdpa:cudnn" in lines["kernel, no statistics, fwd+bwd >= the fastest SDPA backend"]
    fwd = next(v for k, v in lines.items() if k.endswith("fwd") and "1.10x" in k)
    assert "met; he: 1.08" in fwd and "not met" not in fwd
    assert "not met; he: 1.10" in next(v for k, v in lines.items() if k.endswith("fwd+bwd") and "1.05x" in k)
    assert "met; he2024: 1.11" in next(v for k, v in lines.items() if k.startswith("paper-config"))


def test_hf_benchmark_times_every_arm_side_by_side(tmp_path):
    from benchmarks.hf import main

    rows = main(["--quick", "--reps", "2", "--out", str(tmp_path)])
    assert {r["attention"] for r in rows} == {"sdpa", "lightning_icl", "lightning_icl + stats"}
    assert len(rows) == 6 and all(r["step ms"] > 0 for r in rows)
    assert [r["vs sdpa"] for r in rows if r["attention"] == "sdpa"] == [1.0, 1.0]
    table = (tmp_path / "hf_attention_cpu_quick.md").read_text()
    assert "Goal: a training step with every head's statistics recorded" in table and "- torch: " in table


def test_train_step_benchmark_times_its_arms_side_by_side(tmp_path):
    from benchmarks import train_step

    rows = train_step.main(["--size=small", "--steps=2", "--warmup=1", "--arms=1,2,3", f"--out={tmp_path}"])
    assert [r["arm"] for r in rows] == ["plain", "+ on-device sampling", "+ fused AdamW"]
    assert rows[0]["vs plain"] == "1.00x" and all(float(r["ms/step"]) > 0 for r in rows)
    md = (tmp_path / "train_step_cpu.md").read_text()
    assert "Model FLOPs per step" in md and "Measured dense matmul in this run" in md and "torch:" in md
