"""The README's commands and Python snippets stay true: every Python block runs in a test, every
shell command names files, modules, subcommands and options that exist."""

import os
import re
import shlex

import pytest
import torch

from lightning_icl.cli import main

ROOT = os.path.join(os.path.dirname(__file__), "..")

# A string that singles out each Python block of the README, and the test that runs it.
SNIPPETS = {
    "CaptureSpec(": "test_python_snippet_runs",
    "concept_patching(": "test_after_training_snippet_runs_on_the_api_snippets_model",
    "GPT2LMHeadModel(": "test_drop_in_snippet_runs_and_measures",
    "class TinyLM(": "test_hand_written_model_snippets_run_and_measure",
    "class MeasuredTinyLM(": "test_hand_written_model_snippets_run_and_measure",
    "record_attention(": "test_hugging_face_snippet_runs",
}


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme(), flags=re.S)


def snippet(key: str) -> str:
    assert key in SNIPPETS, f"add {key!r} to SNIPPETS"
    found = [s for s in snippets() if key in s]
    assert len(found) == 1, f"{len(found)} README Python blocks contain {key!r}"
    return found[0]


def run(key: str, namespace: dict | None = None) -> dict:
    namespace = {} if namespace is None else namespace
    exec(compile(snippet(key), "README.md", "exec"), namespace)
    return namespace


def non_empty_lines(text: str) -> int:
    return len([line for line in text.splitlines() if line.strip()])


def test_every_python_block_is_run_by_a_test():
    blocks = snippets()
    assert len(blocks) == len(SNIPPETS)
    for block in blocks:
        keys = [key for key in SNIPPETS if key in block]
        assert len(keys) == 1, f"a README Python block is named by {keys} in SNIPPETS, not by one:\n{block}"
    for test in set(SNIPPETS.values()):
        assert callable(globals().get(test)), test


def test_python_snippet_runs():
    namespace = run("CaptureSpec(")
    cap = namespace["cap"]
    assert cap.residual[1].shape == (64, 16, 64)
    assert cap.stats[0]["class_mass"].shape == (64, 4, 16, 3)
    assert isinstance(namespace["logits"], torch.Tensor)


def test_after_training_snippet_runs_on_the_api_snippets_model():
    namespace = run("CaptureSpec(")  # the second continues from the first's module and data
    run("concept_patching(", namespace)
    assert namespace["means"].means.shape[0] == 2  # one row of concept means per layer


def test_drop_in_snippet_runs_and_measures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert non_empty_lines(snippet("GPT2LMHeadModel(")) < 15
    namespace = run("GPT2LMHeadModel(")
    decodability, ablation = namespace["callbacks"][:2]  # the Trainer appends its own to the list
    assert [r["step"] for r in decodability.history] == [10, 20]
    assert len(decodability.history[-1]["cd"]) == 2  # one value per GPT-2 block
    assert torch.tensor(ablation.history[-1]["loss_effect"]).shape == (2, 4)


def test_hand_written_model_snippets_run_and_measure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_block, drop_in = snippet("class TinyLM("), snippet("class MeasuredTinyLM(")
    assert not re.search(r"(?m)^(from|import) lightning_icl", model_block)  # PyTorch and Lightning alone
    assert non_empty_lines(drop_in) < 15
    namespace = run("class MeasuredTinyLM(", run("class TinyLM("))
    decodability, ablation = namespace["callbacks"][:2]
    assert [r["step"] for r in decodability.history] == [10, 20]
    cd = decodability.history[-1]["cd"]
    assert len(cd) == 2 and all(0.0 <= value <= 1.0 for value in cd)  # one value per hand-written layer
    assert decodability.history[-1]["chance"] == 0.25  # 4 tasks
    effects = torch.tensor(ablation.history[-1]["loss_effect"])
    assert effects.shape == (2, 4) and torch.isfinite(effects).all()
    assert (effects != 0).any()  # the hooks reached the heads: removing them changes the loss
    assert (tmp_path / "decodability.jsonl").exists() and (tmp_path / "ablation.jsonl").exists()
    # between measurements the model runs as written: no hook stays registered after the fit
    model = namespace["model"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_hugging_face_snippet_runs():
    namespace = run("record_attention(")
    assert namespace["record"].stats[1]["entropy"].shape == (2, 4, 10)
    assert namespace["logits"].shape == (2, 10, 16)


# ---- shell blocks ------------------------------------------------------------------------


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", readme(), flags=re.S)


def commands() -> list[list[str]]:
    """Every command of the README's bash blocks, as words: continued lines joined, comments dropped,
    ``&&`` chains split."""
    found = []
    for block in bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                if words:
                    found.append(words)
    return found


def config_header_files(config: str) -> list[str]:
    """The ``--config`` files of the ``Run:`` command in a config's header."""
    with open(os.path.join(ROOT, config)) as f:
        head = f.read().split("seed_everything")[0]
    return re.findall(r"--config (\S+)", re.search(r"Run: lightning-icl fit (.*)", head).group(1))


def options(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--")]


def help_text(subcommand: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    blocks = bash_blocks()
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    # CI makes its own venv, then runs the part of the README command after the venv is active
    assert test_command.split(". .venv/bin/activate && ", 1)[1] in ci
    quickstart = next(b.strip() for b in blocks if "configs/quickstart.yaml" in b)
    assert os.path.exists(os.path.join(ROOT, "configs", "quickstart.yaml")) and "lightning-icl fit" in quickstart


SETUP = {"python3", ".", "pip", "ruff", "pytest"}  # the two commands' set-up and checks, which CI runs


def test_every_shell_command_names_what_exists(capsys):
    """Scripts and modules exist; ``lightning-icl`` subcommands exist, with the options they are given;
    a fit's config files are those its experiment's header composes, and the whole command parses."""
    seen = set()
    for words in commands():
        program, args = words[0], words[1:]
        seen.add(program)
        if program in SETUP:
            continue
        if program in ("bash", "python") and args[0] != "-m":
            assert os.path.isfile(os.path.join(ROOT, args[0])), words
        elif program == "python":
            path = os.path.join(ROOT, *args[1].split("."))
            assert os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py")), words
        elif program == "lightning-icl" and args[0] in ("prune", "core", "report"):
            shown = help_text(args[0], capsys)
            for option in options(args):
                assert re.search(rf"{re.escape(option)}\b", shown), (option, words)
        elif program == "lightning-icl" and args[0] in ("fit", "validate", "test"):
            if args[1:] == ["--help"]:
                continue
            configs = [args[i + 1] for i, w in enumerate(args) if w == "--config"]
            for config in configs:
                assert os.path.isfile(os.path.join(ROOT, config)), words
            if configs:
                assert configs == config_header_files(configs[-1]), words
            with pytest.raises(SystemExit) as exit_info:
                main([*args, "--print_config"])
            assert exit_info.value.code == 0, words
            capsys.readouterr()
        else:
            raise AssertionError(f"the README runs {program!r}, which no check here covers: {words}")
    assert {"lightning-icl", "python", "bash"} <= seen


def test_relative_links_and_anchors_resolve():
    text = readme()
    slugs = set()
    for heading in re.findall(r"(?m)^#+ (.*)$", re.sub(r"```.*?```", "", text, flags=re.S)):
        slugs.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links
    for link in links:
        if link.startswith("#"):
            assert link[1:] in slugs, link
        elif "://" not in link:
            assert os.path.exists(os.path.join(ROOT, link.split("#")[0])), link
    figure = os.path.join(ROOT, "docs", "figures", "quickstart_decodability.png")
    assert "](docs/figures/quickstart_decodability.png)" in text and os.path.getsize(figure) < 200_000
