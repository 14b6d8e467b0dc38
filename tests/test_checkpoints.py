"""Checkpoints: never the only copy in flight, damage is an error naming the file, a diverged
model is never saved; a diverging run stops at its step in one line."""

import os
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_icl import ICLModule, ModularArithmeticDataModule
from lightning_icl.checkpoints import DivergenceError, SafeCheckpointIO, load_checkpoint, seal, verify


def tiny(lr: float = 3e-3):
    data = ModularArithmeticDataModule(p=5, num_tasks=4, num_ood_tasks=4, num_shots=4, batch_size=8,
                                       eval_batch_size=8, num_eval_batches=1, seed=0)  # fmt: skip
    return ICLModule.from_kwargs(task=data.task_info, d_model=32, n_layers=1, n_heads=2, lr=lr, warmup_steps=0), data


def trainer(root, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=5, check_val_every_n_epoch=None,
                     default_root_dir=str(root), logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, plugins=[SafeCheckpointIO()],
                     callbacks=[ModelCheckpoint(dirpath=str(root), save_last=True, save_top_k=1)],
                     **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    module, data = tiny()
    trainer(root, 5).fit(module, data)
    return root / "last.ckpt"


def test_a_checkpoint_carries_a_digest_and_flipped_bytes_are_an_error_naming_the_file(saved, tmp_path):
    checkpoint = load_checkpoint(str(saved))
    assert len(checkpoint["lightning_icl"]["digest"]) == 64
    damaged = tmp_path / "damaged.ckpt"
    data = bytearray(saved.read_bytes())
    # flip bytes inside the largest tensor record (the embedding), far from the archive's headers
    weight = checkpoint["state_dict"]["model.embed.weight"].numpy().tobytes()
    at = bytes(data).find(weight[:64])
    assert at > 0
    data[at + 100 : at + 104] = bytes(b ^ 0xFF for b in data[at + 100 : at + 104])
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"checkpoint {damaged} is damaged"):
        load_checkpoint(str(damaged))
    module, _ = tiny()
    with pytest.raises(ValueError, match="damaged"):  # also through Lightning's own loading
        ICLModule.load_from_checkpoint(str(damaged), map_location="cpu")
    del module


@pytest.mark.parametrize("kind", ["truncated", "empty", "missing", "foreign"])
def test_an_unreadable_checkpoint_is_one_error_naming_the_file(saved, tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(ValueError, match=f"checkpoint {path} "):
        load_checkpoint(str(path))


def test_a_write_that_dies_leaves_the_previous_checkpoint_whole(saved, tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes(saved.read_bytes())
    checkpoint = load_checkpoint(str(saved))

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped while writing

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        SafeCheckpointIO().save_checkpoint(checkpoint, str(target))
    monkeypatch.undo()
    assert load_checkpoint(str(target))["global_step"] == checkpoint["global_step"]  # the old one, whole
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temporary file left behind


def test_non_finite_weights_are_never_saved(saved):
    checkpoint = load_checkpoint(str(saved))
    del checkpoint["lightning_icl"]["digest"]
    checkpoint["state_dict"]["model.embed.weight"][0, 0] = float("nan")
    with pytest.raises(DivergenceError, match=r"model.embed.weight is not finite at step 5; no checkpoint written"):
        seal(checkpoint)
    good = load_checkpoint(str(saved))
    verify(good)  # an intact checkpoint passes


def test_a_diverging_run_stops_at_its_step_and_keeps_the_checkpoint_from_before(tmp_path):
    module, data = tiny(lr=3e-3)
    fit = trainer(tmp_path, 12)

    class Explode(L.Callback):  # the step-8 update leaves a weight infinite, as a blown-up gradient would
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 8:
                with torch.no_grad():
                    pl_module.model.embed.weight.mul_(float("inf"))

    fit.callbacks.insert(0, Explode())
    with pytest.raises(DivergenceError) as err:
        fit.fit(module, data)
    message = str(err.value)
    assert "\n" not in message
    assert re.match(r"training diverged: train/loss is (nan|inf) at step 8; last checkpoint \(from before", message)
    assert load_checkpoint(str(tmp_path / "last.ckpt"))["global_step"] == 5  # the one from before it
