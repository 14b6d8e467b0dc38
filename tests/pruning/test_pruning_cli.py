"""`lightning-icl prune` and `lightning-icl core` on a checkpoint made by a few steps of `fit`."""

import csv
import glob
import json

import lightning as L
import pytest
import torch

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl.checkpoints import load_datamodule, load_trained
from lightning_icl.cli import main
from lightning_icl.pruning import summarize_runs, write_core_report


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    main(
        [
            "fit",
            "--model=ICLModule",
            "--model.transformer.d_model=32",
            "--model.transformer.n_heads=2",
            "--data=ModularArithmeticDataModule",
            "--data.p=7",
            "--data.num_tasks=4",
            "--data.num_shots=8",
            "--data.batch_size=8",
            "--data.num_eval_batches=1",
            "--trainer.max_steps=3",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
        ]
    )
    (ckpt,) = glob.glob(str(root / "**" / "*.ckpt"), recursive=True)
    return ckpt


def test_checkpoint_gives_back_the_module_and_the_datamodule(checkpoint):
    module, data = load_trained(checkpoint)
    assert module.model.n_heads == 2 and data.p == 7 and data.num_shots == 8
    assert data.batch_format == "icl"
    assert data.val_dataloader()[0].dataset.name == "val/id_seen"


def test_a_checkpoint_with_the_earlier_flat_model_arguments_still_loads(checkpoint, tmp_path):
    saved = torch.load(checkpoint, weights_only=False)
    hp = saved["hyper_parameters"]
    assert set(hp["transformer"]) >= {"d_model", "n_heads"} and "lr" in hp["optimizer"]  # plain dicts
    saved["hyper_parameters"] = {"task": hp["task"], **hp["transformer"], **hp["optimizer"]}
    torch.save(saved, tmp_path / "flat.ckpt")
    module, data = load_trained(str(tmp_path / "flat.ckpt"))
    current, _ = load_trained(checkpoint)
    assert module.model.config == current.model.config and module.optimizer_config == current.optimizer_config
    torch.testing.assert_close(module.state_dict(), current.state_dict())
    assert data.p == 7


def test_datamodule_of_a_plain_trainer_fit_is_found_by_its_arguments(tmp_path):
    data = tiny_modular(p=5)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=1, limit_val_batches=0, logger=False))
    trainer.fit(tiny_module(data, warmup_steps=0), data)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    rebuilt = load_datamodule(str(tmp_path / "plain.ckpt"))
    assert type(rebuilt) is type(data) and rebuilt.p == 5
    torch.testing.assert_close(rebuilt.id_tasks, data.id_tasks)


@pytest.mark.slow
def test_prune_command_writes_the_mask(checkpoint, tmp_path, capsys):
    out = tmp_path / "prune"
    main(["prune", f"--ckpt={checkpoint}", "--sparsity=0.5", "--seed=3", "--steps=6", f"--out={out}"])
    mask = json.loads((out / "mask.json").read_text())
    assert mask["seed"] == 3 and mask["target_sparsity"] == 0.5 and mask["steps"] == 6
    assert torch.tensor(mask["heads"]).shape == (2, 2) and len(mask["mlps"]) == 2
    assert set(mask["accuracy"]) == set(mask["full_accuracy"]) == {"id_seen", "id_unseen", "ood_seen", "ood_unseen"}
    assert (out / "metrics.csv").exists()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_core_command_runs_the_sweep_and_writes_the_report(checkpoint, tmp_path, capsys):
    out = tmp_path / "core"
    main(["core", f"--ckpt={checkpoint}", "--sparsities=0.3,0.6", "--seeds=0,1", "--steps=4", f"--out={out}"])
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["target_sparsity"], r["seed"]) for r in rows] == [("0.3", "0"), ("0.3", "1"), ("0.6", "0"), ("0.6", "1")]
    assert "acc_ood_unseen" in rows[0]
    summary = json.loads((out / "core.json").read_text())
    assert torch.tensor(summary["frequency"]).shape == (2, 2) and set(summary["effective_size"]) == set(
        summary["full_accuracy"]
    )
    report = (out / "core.md").read_text()
    assert "Heuristic core" in report and "Effective size" in report and "Head keep frequency" in report
    assert (out / "head_frequency.png").stat().st_size > 0
    assert len(glob.glob(str(out / "sparsity*_seed*" / "mask.json"))) == 4
    assert "heuristic core:" in capsys.readouterr().out


def test_report_from_hand_made_runs(tmp_path):
    def run(seed, heads, acc):
        return {
            "heads": heads,
            "mlps": [1, 0],
            "sparsity": 0.5,
            "head_sparsity": 0.5,
            "target_sparsity": 0.5,
            "seed": seed,
            "accuracy": {"id_seen": acc},
            "full_accuracy": {"id_seen": 0.9},
        }

    summary = summarize_runs([run(0, [[1, 0], [1, 1]], 0.89), run(1, [[1, 1], [0, 1]], 0.88)])
    assert summary["core"] == [[0, 0], [1, 1]] and summary["frequency"] == [[1.0, 0.5], [0.5, 1.0]]
    assert summary["mlp_frequency"] == [1.0, 0.0] and summary["effective_size"] == {"id_seen": 50.0}
    paths = write_core_report(summary, str(tmp_path))
    names = ["runs.csv", "core.md", "core.json", "head_frequency.png"]
    assert all(p.endswith(name) for p, name in zip(paths, names, strict=True))
    assert "L0H0, L1H1" in (tmp_path / "core.md").read_text()


def test_prune_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        main(["prune", "--help"])
    assert info.value.code == 0 and "--sparsity" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["core", "--sparsities=0.3"])  # --ckpt is required
