"""The command line: every config in configs/ parses, instantiates and trains a few steps."""

import glob
import json
import os

import pytest
import yaml

from lightning_icl.cli import main

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))

# Shrink any config to a few CPU steps; data overrides per DataModule keep it valid.
# (no warm-up: the configs warm up over more steps than the shrunk run has, which ICLModule refuses)
SHRINK_MODEL = [
    "--model.init_args.d_model=32",
    "--model.init_args.n_heads=2",
    "--model.init_args.n_layers=1",
    "--model.init_args.warmup_steps=0",
]
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


def shrunk(tmp_path, config):
    with open(config) as f:
        data_class = yaml.safe_load(f)["data"]["class_path"].split(".")[-1]
    return [
        f"--config={config}",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.name=run",
        *SHRINK_MODEL,
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


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.basename(c))
def test_config_trains_a_few_steps_when_shrunk(tmp_path, config, capsys):
    main(["fit", *shrunk(tmp_path, config)])
    out = capsys.readouterr().out
    run = tmp_path / "run" / "version_0"
    assert (run / "metrics.csv").exists() and (run / "config.yaml").exists()
    assert (run / "icl_curves.jsonl").exists() and (run / "icl_curves.png").exists()
    assert "wrote" in out and (run / "training_curves.png").exists()


def test_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--trainer.max_steps" in capsys.readouterr().out
    config = next(c for c in CONFIGS if "han2024" in c)
    with pytest.raises(SystemExit):
        main(["fit", f"--config={config}", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["n_layers"] == 12
    assert printed["data"]["class_path"].endswith("SparseLinearRegressionDataModule")


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
    model = ["--model=ICLModule", "--model.d_model=32", "--model.n_heads=2"]
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


def test_bad_data_argument_is_reported():
    with pytest.raises(ValueError, match="p must be a prime, got 9"):
        main(["fit", "--model=ICLModule", "--data=ModularArithmeticDataModule", "--data.p=9", "--trainer.max_steps=1"])


@pytest.mark.slow
def test_circuits_add_on_config_measures_overlap_between_the_families(tmp_path):
    config = next(c for c in CONFIGS if "multi_family" in c)
    add_on = os.path.join(os.path.dirname(config), "add", "circuits.yaml")
    args = shrunk(tmp_path, config)
    # the add-on reads 2 held-out batches per family: the shrunk data keeps 2 (not 1) of them
    main(["fit", *args[:1], f"--config={add_on}", *args[1:], "--data.init_args.num_eval_batches=2"])
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
        "--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--trainer.max_steps", "10",
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
