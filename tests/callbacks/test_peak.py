"""``OODPeakCheckpoint`` keeps the checkpoint where the monitored metric peaked and says where."""

import lightning as L
import pytest
import torch

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl import OODPeakCheckpoint
from lightning_icl.module import ICLModule
from lightning_icl.records import read_jsonl

SCRIPT = [0.2, 0.6, 0.4, 0.3]  # the monitored value at the four validations: a peak at the second


class Scripted(ICLModule):
    """Logs ``val/scripted``: SCRIPT's next value at every validation after the sanity check."""

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            done = sum(1 for e in self.eval_history if e["stage"] == "val") - 1
            self.log("val/scripted", SCRIPT[done])


def scripted_module(data):
    L.seed_everything(0, verbose=False)
    base = tiny_module(data)
    return Scripted(data.task_info, base.hparams["transformer"], base.hparams["optimizer"], compile="off")


def fit(tmp_path, max_steps, ckpt_path=None, **callback):
    data = tiny_modular()
    peak = OODPeakCheckpoint(monitor="val/scripted", **callback)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=max_steps, val_check_interval=10), callbacks=[peak])
    trainer.fit(scripted_module(data), data, ckpt_path=ckpt_path)
    return trainer, peak


def test_the_checkpoint_at_the_peak_is_kept_with_its_step_and_value(tmp_path, caplog):
    with caplog.at_level("INFO"):
        trainer, peak = fit(tmp_path, 40)
    assert (peak.peak_step, peak.peak_value) == (20, pytest.approx(0.6))
    assert peak.best_model_path.endswith("peak-20.ckpt")
    assert torch.load(peak.best_model_path, weights_only=False)["global_step"] == 20  # the model at the peak
    records = read_jsonl(f"{trainer.log_dir}/ood_peak.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert [r["value"] for r in records] == pytest.approx(SCRIPT)
    assert records[-1]["peak_step"] == 20 and records[-1]["peak_checkpoint"] == peak.best_model_path
    assert "val/scripted peaked at 0.6000 at step 20 (0.3000 at the last evaluation, step 40)" in caplog.text
    assert (tmp_path / "lightning_logs" / "version_0" / "figures" / "ood_peak.png").exists()


def test_a_resumed_run_keeps_its_peak(tmp_path):
    _, first = fit(tmp_path, 20)  # validations at 10 and 20: the peak so far is step 20
    assert first.peak_step == 20
    trainer, resumed = fit(tmp_path / "again", 40, ckpt_path=first.best_model_path)
    assert resumed.peak_step == 20 and [r["step"] for r in resumed.history] == [10, 20, 30, 40]
    records = read_jsonl(f"{trainer.log_dir}/ood_peak.jsonl")
    assert [r["value"] for r in records] == pytest.approx(SCRIPT)  # the file holds the whole run
    assert records[1]["peak_checkpoint"] == first.best_model_path


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="save_top_k=3"):
        OODPeakCheckpoint(save_top_k=3)
    with pytest.raises(ValueError, match="mode"):
        OODPeakCheckpoint(mode="peak")
    data = tiny_modular(num_ood_tasks=0)  # no OOD split: the default monitor cannot be found
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=10), callbacks=[OODPeakCheckpoint()])
    with pytest.raises(ValueError, match=r"no 'ood_unseen' split; its splits are \['id_seen', 'id_unseen'\]"):
        trainer.fit(tiny_module(data), data)


@pytest.mark.slow
def test_two_processes_keep_one_peak_and_one_record_file(tmp_path):
    data = tiny_modular()
    peak = OODPeakCheckpoint()
    kwargs = trainer_kwargs(
        tmp_path, max_steps=20, val_check_interval=10, logger=False, devices=2, strategy="ddp_spawn"
    )
    L.Trainer(**kwargs, callbacks=[peak]).fit(tiny_module(data), data)
    records = read_jsonl(str(tmp_path / "ood_peak.jsonl"))  # written by rank 0 (spawn: not this process)
    assert [r["step"] for r in records] == [10, 20] and records[-1]["peak_step"] in (10, 20)
    assert records[-1]["peak_checkpoint"].endswith(f"peak-{records[-1]['peak_step']}.ckpt")
    assert (tmp_path / "figures" / "ood_peak.png").exists()
