"""``lightning-icl report`` draws every figure type from a small run, and a phase diagram from a sweep."""

import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger

import lightning_icl as icl
from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl.report import callback_records, hyperparameters, load_yaml, main, seed_groups


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    data = tiny_modular(num_eval_batches=4)
    callbacks = [
        icl.ConceptDecodability(k=5, probe=True, by_shot=True),
        icl.HeadAblation(),
        icl.HeadAttribution(every_n_steps=5),
        icl.AttentionStatistics(every_n_steps=5),
        icl.ICLCurves(by_concept=True),
        icl.CircuitOverlap(families={"id": 0, "ood": 2}),
        icl.ConceptPatching(),
    ]
    kwargs = trainer_kwargs(root, logger=CSVLogger(str(root), name="run"), limit_val_batches=4, callbacks=callbacks)
    trainer = L.Trainer(**kwargs)
    trainer.fit(tiny_module(data), data)
    return trainer.log_dir


def copies_with(run_dir, tmp_path, name: str, hparams: list[dict]) -> list[str]:
    """Copies of ``run_dir`` under ``tmp_path/<name><i>``, the i-th with ``hparams[i]`` merged into its hparams.yaml."""
    runs = []
    for i, update in enumerate(hparams):
        copy = tmp_path / f"{name}{i}"
        shutil.copytree(run_dir, copy)
        hp = load_yaml(copy / "hparams.yaml")
        hp.update(update)
        (copy / "hparams.yaml").write_text(yaml.safe_dump(hp))
        runs.append(str(copy))
    return runs


@pytest.mark.slow
def test_report_draws_every_figure_of_a_run(run_dir, tmp_path):
    index = main([run_dir, "--out", str(tmp_path / "report")])
    expected = ["training", "per_shot", "curves_by_concept", "decodability"]
    expected += ["heads", "attention", "circuits", "patching"]
    for name in expected:
        path = tmp_path / "report" / f"{name}.png"
        assert path.exists() and path.stat().st_size > 10_000, name
    page = Path(index).read_text()
    assert page.count("data:image/png;base64,") == len(expected)  # self-contained
    assert "val/id_seen/acc" in page  # the final metrics table


@pytest.mark.slow
def test_report_of_a_sweep_draws_its_phase_diagram(run_dir, tmp_path):
    grid = [(4, 0.5), (8, 0.5), (4, 0.7), (8, 0.7)]
    runs = copies_with(run_dir, tmp_path, "run", [{"num_tasks": n, "alpha": a} for n, a in grid])
    assert hyperparameters(runs[1])["num_tasks"] == 8
    assert hyperparameters(runs[1])["d_model"] == 32 and hyperparameters(runs[1])["lr"] == 3e-3  # the model's configs
    page = Path(main([*runs, "--out", str(tmp_path / "sweep"), "--phase", "num_tasks,alpha"])).read_text()
    assert (tmp_path / "sweep" / "phase_diagram.png").exists() and (tmp_path / "sweep" / "phase_lines.png").exists()
    # a panel for each of the four splits' last-shot accuracy, the default
    assert "Phase diagram: val/id_seen/acc_last, val/id_unseen/acc_last, val/ood_seen/acc_last, " in page
    main([*runs, "--out", str(tmp_path / "one"), "--phase", "num_tasks,alpha", "--metric", "val/ood_unseen/acc"])
    assert (tmp_path / "sweep" / "run3_decodability.png").exists()  # every run's figures, prefixed
    with pytest.raises(ValueError, match="no run has both hyperparameters"):
        main([runs[0], "--out", str(tmp_path / "x"), "--phase", "depth,width"])


def test_tagged_callback_files_are_found(tmp_path):
    for name in ("decodability", "decodability_ood", "decodability_extra_stuff", "decodabilityx"):
        (tmp_path / f"{name}.jsonl").write_text('{"step": 1}\n')
    assert sorted(callback_records(str(tmp_path), "decodability")) == [
        "decodability",
        "decodability_extra_stuff",
        "decodability_ood",
    ]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="run directories not found"):
        main([str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--out", str(tmp_path / "r"), "--phase", "num_tasks"])
    os.makedirs(tmp_path / "empty")
    index = main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert "Nothing to draw" in Path(index).read_text()


def test_report_draws_the_core_of_a_sweep_through_the_command_line(tmp_path, capsys):
    from lightning_icl.cli import main as cli_main
    from lightning_icl.pruning import summarize_runs, write_core_report

    full = {"id_seen": 0.95}
    runs = [
        {"heads": [[1, 0], [1, int(seed == 0)]], "mlps": [1, 1], "full_accuracy": full, "accuracy": {"id_seen": acc},
         "target_sparsity": sparsity, "sparsity": sparsity, "head_sparsity": sparsity, "seed": seed}
        for sparsity, acc in ((0.25, 0.94), (0.5, 0.6)) for seed in (0, 1)
    ]  # fmt: skip
    write_core_report(summarize_runs(runs), str(tmp_path / "core"))
    cli_main(["report", str(tmp_path / "core"), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "core.png").exists()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_report_page_has_the_icl_table_and_the_run_configuration(run_dir, tmp_path):
    page = Path(main([run_dir, "--out", str(tmp_path / "report")])).read_text()
    assert "<th>all shots</th><th>first shot</th><th>last shot</th>" in page
    assert "<tr><th>val/ood_unseen/acc</th><td>" in page  # one row per split and metric, three values
    assert "run configuration" in page and "<th>task.vocab_size</th><td>7</td>" in page


@pytest.mark.slow
def test_a_foreign_models_per_shot_curves_and_a_sweeps_seed_band(run_dir, tmp_path):
    # a run without the module's icl_curves.jsonl (a Hugging Face model): per-shot curves from ICLCurves
    foreign = tmp_path / "foreign"
    shutil.copytree(run_dir, foreign)
    (foreign / "icl_curves.jsonl").unlink()
    main([str(foreign), "--out", str(tmp_path / "foreign_report")])
    assert (tmp_path / "foreign_report" / "per_shot.png").exists()
    # two seeds of one configuration: a band over the seeds, and the phase cell averages them
    grid = [(0, 0.5), (1, 0.5), (0, 0.7)]
    runs = copies_with(run_dir, tmp_path, "seed", [{"seed": seed, "alpha": a} for seed, a in grid])
    assert list(seed_groups(runs).values()) == [runs[:2]]
    page = Path(main([*runs, "--out", str(tmp_path / "sweep"), "--phase", "alpha,num_tasks"])).read_text()
    assert (tmp_path / "sweep" / "seeds.png").exists() and "Repeats over seeds" in page
