"""Fault injection: a run killed before, during or after a checkpoint or a validation and then
resumed ends with the same evaluations, metrics and callback records as an uninterrupted run."""

import glob
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_icl import records

FIT = str(Path(__file__).parent / "faults" / "fit.py")
KILLED = 17


def fit(root: Path, policy: str, die: str = "none", ckpt: str | None = None) -> int:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, FIT, str(root), policy, die] + ([ckpt] if ckpt else [])
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode not in (0, KILLED):
        raise AssertionError(done.stderr[-3000:])
    return done.returncode


def run_records(root: Path) -> dict:
    """Everything a reader sees of the run under ``root``: its version folders joined into one."""
    segments = records.run_segments(records.expand_run_dirs([str(root / "run")]))
    assert len(segments) == 1, f"the versions are not recognised as one run: {segments}"
    merged = records.merge_segments(segments[0], str(root / "merged"))
    out = {os.path.basename(p): records.read_jsonl(p) for p in glob.glob(os.path.join(merged, "*.jsonl"))}
    out["metrics.csv"] = records.read_metrics_csv(os.path.join(merged, "metrics.csv"))
    return out


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    assert fit(root, "validation") == 0
    return root, run_records(root)


SCENARIOS = [
    ("steps", "checkpoint:20"),  # killed right after the step-20 checkpoint, before step 20's validation
    ("steps", "validation:20"),  # killed during step 20's validation
    ("validation", "after:20"),  # killed after step 20's validation and its checkpoint
    ("validation", "validation:30"),  # killed during the last validation
]


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "die"), SCENARIOS, ids=[f"{p}-{d}" for p, d in SCENARIOS])
def test_a_killed_and_resumed_run_matches_an_uninterrupted_one(uninterrupted, tmp_path, policy, die):
    _, base = uninterrupted
    assert fit(tmp_path, policy, die) == KILLED
    last = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert fit(tmp_path, policy, ckpt=str(last)) == 0
    resumed = run_records(tmp_path)
    assert sorted(resumed) == sorted(base)
    for name, expected in base.items():
        got = resumed[name]
        if name == "metrics.csv":
            for key in expected:
                assert same(got.get(key), expected[key]), f"{key}: {got.get(key)} != {expected[key]}"
            continue
        steps = [r["step"] for r in got]
        assert steps == [r["step"] for r in expected], f"{name}: evaluations at {steps}"
        for x, y in zip(got, expected, strict=True):
            assert same(x, y), f"{name}, step {x['step']}: {[k for k in x if not same(x[k], y.get(k))]} differ"
    # the resumed version alone holds the whole history of every callback and of the module's curves
    version = tmp_path / "run" / "version_1"
    for name in ("decodability.jsonl", "ablation.jsonl", "curves.jsonl", "attribution.jsonl"):
        assert [r["step"] for r in records.read_jsonl(str(version / name))] == [r["step"] for r in base[name]]
    assert {r["step"] for r in records.read_jsonl(str(version / "icl_curves.jsonl"))} == {10, 20, 30}


@pytest.mark.slow
def test_the_last_checkpoint_holds_the_last_evaluation(uninterrupted):
    root, _ = uninterrupted
    ckpt = torch.load(root / "run" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    histories = {k: [r["step"] for r in v["history"]] for k, v in ckpt["callbacks"].items() if "history" in v}
    assert histories and all(steps[-1] == 30 for steps in histories.values()), histories
    assert [e["step"] for e in ckpt[records.CHECKPOINT_KEY]["eval_history"]] == [10, 20, 30]
