"""The README's commands and Python snippet stay true."""

import os
import re

import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme(), flags=re.S)


def test_python_snippet_runs():
    snippet = next(s for s in snippets() if "CaptureSpec" in s)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    cap = namespace["cap"]
    assert cap.residual[1].shape == (64, 16, 64)
    assert cap.stats[0]["class_mass"].shape == (64, 4, 16, 3)
    assert isinstance(namespace["logits"], torch.Tensor)


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", readme(), flags=re.S)
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    # CI makes its own venv, then runs the part of the README command after the venv is active
    assert test_command.split(". .venv/bin/activate && ", 1)[1] in ci
    quickstart = next(b.strip() for b in blocks if "configs/quickstart.yaml" in b)
    assert os.path.exists(os.path.join(ROOT, "configs", "quickstart.yaml")) and "lightning-icl fit" in quickstart


def test_drop_in_snippet_runs_and_measures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippet = next(s for s in snippets() if "GPT2LMHeadModel" in s)
    assert len([line for line in snippet.splitlines() if line.strip()]) < 15
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    decodability, ablation = namespace["callbacks"][:2]  # the Trainer appends its own to the list
    assert [r["step"] for r in decodability.history] == [10, 20]
    assert len(decodability.history[-1]["cd"]) == 2  # one value per GPT-2 block
    assert torch.tensor(ablation.history[-1]["loss_effect"]).shape == (2, 4)


def test_after_training_snippet_runs_on_the_api_snippets_model():
    namespace: dict = {}
    for key in ("CaptureSpec", "concept_patching"):  # the second continues from the first's module and data
        snippet = next(s for s in snippets() if key in s)
        exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["means"].means.shape[0] == 2  # one row of concept means per layer


def test_hugging_face_snippet_runs():
    snippet = next(s for s in snippets() if "record_attention" in s)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["record"].stats[1]["entropy"].shape == (2, 4, 10)
    assert namespace["logits"].shape == (2, 10, 16)
