"""Two processes on CPU (gloo): metrics equal the single-process values, ranks see distinct data."""

import json

import lightning as L
import pytest
import torch

from conftest import tiny_modular, tiny_module, trainer_kwargs


class RecordTrainBatches(L.Callback):
    """Gathers a fingerprint of every training batch from every rank into a JSON file."""

    def __init__(self, path: str) -> None:
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(int((batch.inputs * torch.arange(batch.inputs.numel()).view_as(batch.inputs)).sum()))

    def on_train_end(self, trainer, pl_module):
        gathered = pl_module.all_gather(torch.tensor(self.seen))  # [world, steps]
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(gathered.tolist(), f)


def ddp(tmp_path, **kw):
    return trainer_kwargs(tmp_path, devices=2, strategy="ddp_spawn", logger=False, **kw)


@pytest.mark.slow
def test_validation_under_ddp_equals_one_process(tmp_path):
    torch.manual_seed(0)
    data = tiny_modular(num_eval_batches=4)
    # well-separated logits: an untrained model's are nearly tied, and one process and two may
    # sum in another order and flip an argmax, which would move an accuracy by a whole answer
    module = tiny_module(data, init_std=0.5)
    single = L.Trainer(**trainer_kwargs(tmp_path, logger=False, limit_val_batches=4)).validate(
        module, data, verbose=False
    )
    double = L.Trainer(**ddp(tmp_path, limit_val_batches=4)).validate(module, data, verbose=False)
    merged_single = {k: v for d in single for k, v in d.items()}
    merged_double = {k: v for d in double for k, v in d.items()}
    assert set(merged_single) == set(merged_double) and "val/ood_unseen/acc_last" in merged_single
    for key, value in merged_single.items():
        assert merged_double[key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.slow
def test_training_under_ddp_gives_each_rank_its_own_batches(tmp_path):
    record = tmp_path / "batches.json"
    torch.manual_seed(0)
    data = tiny_modular()
    module = tiny_module(data, warmup_steps=2)
    trainer = L.Trainer(**ddp(tmp_path, max_steps=4, val_check_interval=4, callbacks=[RecordTrainBatches(str(record))]))
    trainer.fit(module, data)
    per_rank = json.loads(record.read_text())
    assert len(per_rank) == 2 and len(per_rank[0]) == 4
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0])) == 4
