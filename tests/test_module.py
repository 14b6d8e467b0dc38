import json
import os

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl import ICLModule, SparseLinearRegressionDataModule
from lightning_icl.config import OptimizerConfig, TransformerConfig
from lightning_icl.metrics import PerShotMean, per_shot_mean
from lightning_icl.optim import lr_factor


def test_per_shot_mean_against_a_loop():
    values = torch.rand(200)
    shot = torch.randint(6, (200,))
    shot[shot == 4] = 0  # shot 4 never seen
    expected = [values[shot == k].mean().item() if (shot == k).any() else float("nan") for k in range(6)]
    got = per_shot_mean(values, shot, 6)
    torch.testing.assert_close(got.float(), torch.tensor(expected), equal_nan=True)
    metric = PerShotMean(6)
    metric.update(values[:120], shot[:120])
    metric.update(values[120:], shot[120:])
    torch.testing.assert_close(metric.compute().float(), torch.tensor(expected), equal_nan=True)
    torch.testing.assert_close(metric.overall().float(), values.mean())


def test_lr_schedule_warmup_then_cosine():
    f = dict(warmup_steps=10, total_steps=110, warmup_start_factor=0.01, min_lr_factor=0.1, schedule="cosine")
    assert lr_factor(0, **f) == pytest.approx(0.01)
    assert lr_factor(10, **f) == pytest.approx(1.0)
    assert lr_factor(60, **f) == pytest.approx(0.55)
    assert lr_factor(110, **f) == pytest.approx(0.1)
    assert lr_factor(500, **f) == pytest.approx(0.1)
    assert lr_factor(500, **{**f, "schedule": "constant"}) == 1.0


def test_weight_decay_covers_matrices_and_embeddings_only(modular_data, tmp_path):
    module = tiny_module(modular_data)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=10, logger=False))
    module.trainer = trainer
    opt = module.configure_optimizers()["optimizer"]
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(module.model.embed.weight) in decayed
    assert all(id(p) not in decayed for n, p in module.model.named_parameters() if "ln" in n)
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_seq_len=10), "longer than max_seq_len=10"),
        (dict(d_model=24, n_heads=3), "head dimension of 8"),
        (dict(lr=0.0), "lr must be a finite number > 0"),
        (dict(schedule="step"), "schedule must be one of"),
        (dict(warmup_steps=-1), "warmup_steps"),
    ],
)
def test_bad_module_arguments_are_named(modular_data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_module(modular_data, **kwargs)
    with pytest.raises(ValueError, match="task is required"):
        ICLModule()


def test_configs_are_kept_as_plain_hyperparameters_and_restored_from_a_checkpoint(modular_data, tmp_path):
    module = ICLModule(
        modular_data.task_info,
        TransformerConfig(d_model=32, n_layers=1, n_heads=2, positional="learned"),
        OptimizerConfig(lr=3e-3, betas=(0.9, 0.99)),
    )
    assert module.model.config.vocab_size == modular_data.task_info.vocab_size  # from the task
    assert module.model.max_seq_len == modular_data.task_info.seq_len
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=1, limit_val_batches=0, logger=logger))
    trainer.fit(module, modular_data)
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        saved = yaml.safe_load(f)  # plain values only
    assert saved["transformer"]["positional"] == "learned" and saved["optimizer"]["betas"] == [0.9, 0.99]
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = ICLModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert restored.model.config == module.model.config and restored.optimizer_config == module.optimizer_config
    # the same module from flat keywords, and from the dicts hparams.yaml holds
    flat = ICLModule.from_kwargs(modular_data.task_info, d_model=32, n_layers=1, n_heads=2, positional="learned",
                                 lr=3e-3, betas=(0.9, 0.99))  # fmt: skip
    dicts = ICLModule(modular_data.task_info, saved["transformer"], saved["optimizer"])
    for other in (flat, dicts):
        assert other.model.config == module.model.config and other.optimizer_config == module.optimizer_config


def test_short_fit_learns_in_context_and_logs_curves(tmp_path):
    L.seed_everything(0)
    data = tiny_modular(num_shots=12, batch_size=64)
    module = tiny_module(data, d_model=64, n_heads=4, lr=3e-3, warmup_steps=20)
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=800, val_check_interval=400, logger=logger))
    trainer.fit(module, data)
    res = module.last_eval
    # in-distribution tasks with seen inputs: identifying the task from the context pays off
    assert res["val/id_seen/acc_last"] > 0.8
    assert res["val/id_seen/acc_last"] > res["val/id_seen/acc_shot0"] + 0.25
    assert res["val/id_seen/loss"] < 1.0
    with open(os.path.join(logger.log_dir, "icl_curves.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert {r["step"] for r in rows} == {400, 800}
    assert {(r["split"], r["metric"]) for r in rows} >= {("id_seen", "acc"), ("ood_unseen", "loss")}
    assert all(len(r["by_shot"]) == 12 for r in rows)


def test_vector_task_logs_mse(tmp_path):
    data = SparseLinearRegressionDataModule(dim=8, num_bases=2, rank=4, num_shots=6, batch_size=16, num_eval_batches=2)
    module = ICLModule.from_kwargs(task=data.task_info, d_model=32, n_layers=1, n_heads=2, lr=1e-3)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=10, val_check_interval=10, logger=False))
    trainer.fit(module, data)
    assert set(module.last_eval) == {"val/all/mse", "val/all/mse_shot0", "val/all/mse_last"}
    assert module.last_eval["val/all/mse_shot0"] > 0


def _fit(tmp_path, max_steps, ckpt_path=None, callbacks=()):
    L.seed_everything(0)
    data = tiny_modular()
    module = tiny_module(data)
    trainer = L.Trainer(
        **trainer_kwargs(tmp_path, max_steps=max_steps, val_check_interval=10, logger=False, callbacks=list(callbacks))
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, trainer


def test_checkpoint_resume_continues_with_identical_metrics(tmp_path):
    straight, _ = _fit(tmp_path / "a", 30)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=10, save_top_k=-1)
    _fit(tmp_path / "b", 10, callbacks=[ckpt])
    path = os.path.join(tmp_path / "ckpt", sorted(os.listdir(tmp_path / "ckpt"))[0])
    resumed, trainer = _fit(tmp_path / "c", 30, ckpt_path=path)
    assert trainer.global_step == 30
    for key, value in straight.last_eval.items():
        assert resumed.last_eval[key] == pytest.approx(value, abs=1e-6), key
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # the checkpoint alone rebuilds the model
    loaded = ICLModule.load_from_checkpoint(path)
    assert loaded.task == straight.task


def test_training_step_capture_for_callbacks(modular_data):
    from lightning_icl import CaptureSpec
    from lightning_icl.adapters import ICLModuleAdapter

    module = tiny_module(modular_data)
    adapter = ICLModuleAdapter(module)
    batch = modular_data.train_sampler()(torch.Generator().manual_seed(0), 0)
    module.training_step(batch, 0)
    assert adapter.training_capture() is None
    adapter.set_training_capture(CaptureSpec(stats=("class_mass", "same_label_mass"), residual=True, layers=[-1]))
    module.training_step(batch, 0)
    cap = adapter.training_capture()
    assert list(cap.stats) == [1] and list(cap.residual) == [1]
    assert cap.stats[1]["class_mass"].shape == (16, 2, 1, 3)  # x, y, z token classes
    torch.testing.assert_close(cap.stats[1]["class_mass"].sum(-1), torch.ones(16, 2, 1))
