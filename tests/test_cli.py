"""The command line: every file in configs/ composes as its header says, parses, instantiates and
trains a few steps."""

import glob
import json
import os
import re

import pytest
import yaml

from lightning_icl.cli import main

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))  # the experiments
PIECES = sorted(set(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)) - set(CONFIGS))

# Shrink any config to a few CPU steps; data overrides per DataModule keep it valid.
# (no warm-up: the configs warm up over more steps than the shrunk run has, which ICLModule refuses)
SHRINK_MODEL = [
    "--model.init_args.transformer.d_model=32",
    "--model.init_args.transformer.n_heads=2",
    "--model.init_args.transformer.n_layers=1",
    "--model.init_args.optimizer.warmup_steps=0",
]
SHRINK_MODELS = {
    "HFCausalLMModule": ["--model.init_args.optimizer.warmup_steps=0"]
}  # its configs are CPU-sized already
SHRINK_DATA = {
    "ModularArithmeticDataModule": [
        "--data.init_args.num_tasks=4",
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=8",
        "--data.init_args.num_workers=0",
    ],
    "SparseLinearRegressionDataModule": ["--data.init_args.batch_size=8"],
    "LinearRegressionDataModule": ["--data.init_args.batch_size=8", "--data.init_args.curriculum_interval=2"],
    "BitwiseDataModule": ["--data.init_args.batch_size=7", "--data.init_args.eval_batch_size=7"],
    "MultiFamilyDataModule": ["--data.init_args.batch_size=8", "--data.init_args.num_eval_batches=1"],
}


def composed(config: str) -> list[str]:
    """The ``--config`` files of the command in ``config``'s header (``Run: lightning-icl fit ...``)."""
    with open(config) as f:
        head = f.read().split("seed_everything")[0]
    run = re.search(r"Run: lightning-icl fit (.*)", head).group(1)
    return [os.path.join(ROOT, path) for path in re.findall(r"--config (\S+)", run)]


def shrunk(tmp_path, config):
    files = composed(config)
    parsed = {}
    for path in files:  # later files override earlier ones, as on the command line
        with open(path) as f:
            parsed.update(yaml.safe_load(f))
    data_class = parsed["data"]["class_path"].split(".")[-1]
    model_class = parsed["model"]["class_path"].split(".")[-1]
    return [
        *(f"--config={path}" for path in files),
        "--trainer.accelerator=cpu",
        "--trainer.precision=32",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.name=run",
        *SHRINK_MODELS.get(model_class, SHRINK_MODEL),
        *SHRINK_DATA[data_class],
    ]


def test_every_config_has_a_header_naming_its_source():
    assert len(CONFIGS) >= 5
    for config in CONFIGS:
        with open(config) as f:
            head = f.read().split("seed_everything")[0]
        assert head.count("#") >= 3 and "Run: lightning-icl fit --config" in head, config
        if "quickstart" not in config:
            assert "Reproduces:" in head and "Expected:" in head, config
        # a trainer piece first, then the experiment itself
        files = [os.path.relpath(path, ROOT) for path in composed(config)]
        assert files[0].startswith("configs/trainer/") and files[-1] == os.path.relpath(config, ROOT), files


def _callback_classes(printed: dict) -> list[str]:
    return [cb["class_path"].split(".")[-1] for cb in printed["trainer"]["callbacks"] or []]


@pytest.mark.parametrize("config", CONFIGS + PIECES, ids=lambda c: os.path.relpath(c, os.path.join(ROOT, "configs")))
def test_every_file_composes_as_its_header_says_and_parses(config, capsys):
    """Each experiment with its trainer piece, each piece with the experiment its header names, each
    add-on after both: the composed config parses; the pieces' callbacks are appended, not replaced."""
    files = composed(config)
    assert config in files and all(os.path.exists(path) for path in files), files
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *(f"--config={path}" for path in files), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    listed = []
    for path in files:
        with open(path) as f:
            trainer = yaml.safe_load(f).get("trainer") or {}
        listed += [cb["class_path"] for cb in trainer.get("callbacks", []) + trainer.get("callbacks+", [])]
    assert _callback_classes(printed) == [name.split(".")[-1] for name in listed]
    assert "ModelCheckpoint" in _callback_classes(printed)  # from the trainer piece
    assert printed["trainer"]["check_val_every_n_epoch"] is None


def test_every_file_in_configs_is_exercised():
    """The test above reaches every file: the experiments, and each piece through some command."""
    reached = {os.path.normpath(path) for config in CONFIGS + PIECES for path in composed(config)}
    assert {os.path.normpath(path) for path in CONFIGS + PIECES} <= reached


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.basename(c))
def test_config_trains_a_few_steps_when_shrunk(tmp_path, config, capsys):
    main(["fit", *shrunk(tmp_path, config)])
    out = capsys.readouterr().out
    run = tmp_path / "run" / "version_0"
    assert (run / "metrics.csv").exists() and (run / "config.yaml").exists()
    assert (run / "icl_curves.jsonl").exists() and (run / "icl_curves.png").exists()
    assert "wrote" in out and (run / "training_curves.png").exists()
    assert f"wrote {run / 'report' / 'index.html'}" in out and (run / "report" / "index.html").exists()
    assert "accuracy, first -> last shot: " in out or "squared error, first -> last shot: " in out
    if "quickstart" in config:  # the showcase: every measurement's line (attention statistics need 100 steps)
        for line in ("most important head", "attribution ranks it", "concept decodability peaks", "callbacks: "):
            assert line in out, out


def test_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--trainer.max_steps" in capsys.readouterr().out
    config = next(c for c in CONFIGS if "han2024" in c)
    with pytest.raises(SystemExit):
        main(["fit", f"--config={config}", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["transformer"]["n_layers"] == 12
    assert printed["data"]["class_path"].endswith("SparseLinearRegressionDataModule")


def test_model_configs_and_callback_cadence_from_flags_and_help(capsys):
    args = [*FLAGS[:2], "--model.transformer.d_model=32", "--model.optimizer.lr=0.01",
            "--trainer.callbacks+=HeadAblation", "--trainer.callbacks.every_n_steps=50",
            "--trainer.callbacks+=ICLCurves", "--trainer.callbacks.tag=a"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["init_args"]
    assert model["transformer"]["d_model"] == 32 and model["optimizer"]["lr"] == 0.01
    ablation, curves = (cb["init_args"] for cb in printed["trainer"]["callbacks"])
    assert ablation["every_n_steps"] == 50 and ablation["num_batches"] == 1  # HeadAblation's own default
    assert curves["tag"] == "a" and curves["num_batches"] == 4 and "dataloader_idx" not in curves
    for flag, name, listed in [
        ("--model.help", "ICLModule", ["--model.transformer.d_model", "--model.optimizer.warmup_steps"]),
        ("--trainer.callbacks.help", "HeadAblation", ["--trainer.callbacks.every_n_steps", "--trainer.callbacks.tag"]),
    ]:
        with pytest.raises(SystemExit):
            main(["fit", flag, name])
        out = capsys.readouterr().out
        assert all(f in out for f in listed), out


@pytest.mark.slow
def test_short_class_names_then_validate_and_test_from_the_checkpoint(tmp_path, capsys, caplog):
    common = [
        "--data=ModularArithmeticDataModule",
        "--data.p=7",
        "--data.num_tasks=4",
        "--data.batch_size=8",
        "--data.num_eval_batches=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    model = ["--model=ICLModule", "--model.transformer.d_model=32", "--model.transformer.n_heads=2"]
    main(["fit", *model, *common, "--trainer.max_steps=3"])
    ckpts = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    assert len(ckpts) == 1
    caplog.clear()
    with caplog.at_level("INFO"):  # the ICL summary of each
        main(["validate", *model, *common, f"--ckpt_path={ckpts[0]}"])
        assert "val/id_seen/acc" in caplog.text
        main(["test", *model, *common, f"--ckpt_path={ckpts[0]}"])
        assert "test/ood_unseen/loss" in caplog.text
    main(["test", *model, *common, f"--ckpt_path={ckpts[0]}", "--verbose=true"])  # Lightning's table on request
    assert "test/ood_unseen/loss" in capsys.readouterr().out


def fails(args: list[str], capsys) -> tuple[int, list[str]]:
    """Run the command; return its exit status and its stderr lines."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


FLAGS = ["--model=ICLModule", "--data=ModularArithmeticDataModule", "--trainer.max_steps=1", "--trainer.logger=false"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data.p=9"], "p must be a prime, got 9"),
        (["--model.optimizer.lr=-1"], "lr must be a finite number > 0, got -1"),
        (["--data.num_tasks=0"], "num_tasks must be"),
        (["--model.transformer.n_heads=3"], "n_heads"),
        (["--ckpt_path=/nowhere/last.ckpt"], "checkpoint /nowhere/last.ckpt does not exist"),
    ],
)
def test_a_bad_argument_ends_in_the_packages_message_not_a_traceback(args, message, capsys):
    code, err = fails(["fit", *FLAGS, *args], capsys)
    assert code == 2
    assert err[-1].startswith("lightning-icl: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err) and "Given value" not in "\n".join(err)
    assert "LIGHTNING_ICL_TRACEBACK=1" in err[-2]  # one usage hint, just before the message


def test_a_bad_data_argument_names_the_class_whose_help_lists_its_arguments(capsys):
    _, err = fails(["fit", *FLAGS, "--data.p=8"], capsys)
    assert "--data.help ModularArithmeticDataModule" in err[-2]
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        shown = f.read()
    assert f"\n{err[-2]}\n{err[-1]}\n" in shown  # the README shows what the command prints


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "foreign"])
@pytest.mark.parametrize("command", ["validate", "prune", "core"])
def test_a_missing_or_broken_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, command, kind):
    import torch

    path = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "foreign":
        torch.save({"weights": torch.ones(3)}, path)
    args = {"validate": ["validate", *FLAGS[:2], f"--ckpt_path={path}"], "prune": ["prune", f"--ckpt={path}"],
            "core": ["core", f"--ckpt={path}", f"--out={tmp_path}/core"]}[command]  # fmt: skip
    code, err = fails(args, capsys)
    assert code == 2 and err[-1].startswith(f"lightning-icl: error: checkpoint {path} "), err[-1]


def test_report_on_a_missing_directory_or_a_broken_record_file_names_it(tmp_path, capsys):
    code, err = fails(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and str(tmp_path / "nowhere") in err[-1]
    run = tmp_path / "run"
    run.mkdir()
    (run / "ablation.jsonl").write_text('{"step": 1, "loss_effect": [[0.1]]}\n{"step": oops}\n{"step": 3}\n')
    code, err = fails(["report", str(run), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err[-1].endswith("ablation.jsonl, line 2: not a JSON record (Expecting value)")


def test_every_shipped_checkpoint_is_written_after_its_steps_validation():
    """A checkpoint taken before the validation of its step would not hold that evaluation
    (it is recovered on resume, at the cost of validating again); the configs save after it."""
    for config in glob.glob(os.path.join(os.path.dirname(CONFIGS[0]), "**", "*.yaml"), recursive=True):
        with open(config) as f:
            trainer = yaml.safe_load(f).get("trainer") or {}
        callbacks = (trainer.get("callbacks") or []) + (trainer.get("callbacks+") or [])
        for cb in callbacks:
            if cb["class_path"].endswith("ModelCheckpoint"):
                args = cb.get("init_args", {})
                assert not args.get("every_n_train_steps"), config
                assert args.get("save_top_k", 1) >= 1 and args.get("save_last"), config


@pytest.mark.slow
def test_a_diverging_fit_stops_in_one_line_with_a_non_zero_status(tmp_path, capsys):
    args = ["fit", *FLAGS[:2], "--model.optimizer.lr=1e6", "--model.optimizer.warmup_steps=0",
            "--trainer.max_steps=200", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    code, err = fails(args, capsys)
    assert code == 1
    assert re.match(r"lightning-icl: error: training diverged: train/loss is (nan|inf) at step \d+;", err[-1]), err[-1]


@pytest.mark.slow
def test_circuits_add_on_config_measures_overlap_between_the_families(tmp_path):
    add_on = next(c for c in PIECES if c.endswith(os.path.join("add", "circuits.yaml")))
    # the add-on reads 2 held-out batches per family: the shrunk data keeps 2 (not 1) of them
    main(["fit", *shrunk(tmp_path, add_on), "--data.init_args.num_eval_batches=2"])
    record = json.loads((tmp_path / "run" / "version_0" / "circuits.jsonl").read_text().splitlines()[-1])
    assert record["families"] == ["modular", "bitwise"]


def test_step_based_runs_without_a_schedule_validate_ten_times():
    from lightning_icl.cli import validation_schedule

    assert validation_schedule({"max_steps": 500, "val_check_interval": 1.0, "check_val_every_n_epoch": 1}) == 50
    assert validation_schedule({"max_steps": 5, "val_check_interval": 1.0}) == 1
    # a schedule of the user's own, no step limit, or no validation at all: left alone
    assert validation_schedule({"max_steps": 500, "val_check_interval": 100, "check_val_every_n_epoch": None}) is None
    assert validation_schedule({"max_steps": -1, "val_check_interval": 1.0}) is None
    assert validation_schedule({"max_steps": 500, "val_check_interval": 1.0, "limit_val_batches": 0}) is None


@pytest.mark.slow
def test_the_flag_only_command_validates_and_prints_its_summary(tmp_path, capsys, caplog, monkeypatch):
    """The README's flag-only example gives no validation schedule: the run still validates and summarises."""
    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--model", "ICLModule", "--data", "ModularArithmeticDataModule", "--data.p", "7",
        "--data.num_tasks", "4", "--data.batch_size", "8", "--data.num_shots", "4", "--data.num_eval_batches", "1",
        "--model.transformer.d_model", "32", "--model.transformer.n_layers", "1", "--model.transformer.n_heads", "2",
        "--trainer.max_steps", "10",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    with caplog.at_level("INFO"):
        main(args)
    assert "validating every 1 steps" in capsys.readouterr().out
    run = tmp_path / "lightning_logs" / "version_0"
    steps = {json.loads(line)["step"] for line in (run / "icl_curves.jsonl").read_text().splitlines()}
    assert steps == set(range(1, 11))
    assert "ICL summary" in caplog.text
    caplog.clear()
    # a stand-alone validate prints the summary too, not Lightning's table repeated per loader
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    with caplog.at_level("INFO"):
        main(["validate", f"--config={run / 'config.yaml'}", f"--ckpt_path={ckpt}", "--trainer.logger=false"])
    out = capsys.readouterr().out
    assert "ICL summary" in caplog.text and "Validate metric" not in out


@pytest.mark.slow
def test_resuming_into_the_same_logger_version_keeps_its_metrics(tmp_path):
    config = next(c for c in CONFIGS if "quickstart" in c)
    args = [*shrunk(tmp_path, config), "--trainer.logger.init_args.version=0", "--trainer.log_every_n_steps=1"]
    main(["fit", *args])
    version = tmp_path / "run" / "version_0"
    ckpt = version / "checkpoints" / "last.ckpt"
    main(["fit", *args, "--trainer.max_steps=8", f"--ckpt_path={ckpt}"])
    from lightning_icl.records import read_metrics_csv

    steps = [s for s, _ in read_metrics_csv(str(version / "metrics.csv"))["train/loss"]]
    assert steps == list(range(8)), steps  # the first fit's rows too, once each
