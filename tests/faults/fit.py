"""A small fit that can be killed at a chosen point: ``python fit.py ROOT POLICY DIE [CKPT]``.

POLICY: ``steps`` (a checkpoint every 10 steps, written before that step's validation, as
``ModelCheckpoint(every_n_train_steps=...)`` does) or ``validation`` (after every validation, as
the shipped configs do). DIE: ``none``, ``checkpoint:S`` (after step S's checkpoint, before its
validation), ``validation:S`` (during step S's validation) or ``after:S`` (after step S's
validation, before the next step). The process dies with ``os._exit``: no hook runs, as with a kill.
"""

import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_icl import ICLModule, ModularArithmeticDataModule
from lightning_icl.callbacks import ConceptDecodability, HeadAblation, HeadAttribution, ICLCurves
from lightning_icl.checkpoints import SafeCheckpointIO

KILLED = 17


class Die(L.Callback):
    def __init__(self, where: str) -> None:
        kind, _, step = where.partition(":")
        self.kind, self.step = kind, int(step or -1)

    def _die(self, trainer, kind: str) -> None:
        if self.kind == kind and trainer.global_step == self.step and not trainer.sanity_checking:
            os._exit(KILLED)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._die(trainer, "checkpoint")

    def on_validation_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self._die(trainer, "validation")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._die(trainer, "after")


def main(root: str, policy: str, die: str, ckpt: str | None = None) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    data = ModularArithmeticDataModule(p=5, num_tasks=4, num_ood_tasks=4, num_shots=4, batch_size=16,
                                       eval_batch_size=16, num_eval_batches=2, seed=0)  # fmt: skip
    module = ICLModule.from_kwargs(task=data.task_info, d_model=32, n_layers=2, n_heads=2, lr=3e-3, warmup_steps=2)
    if policy == "steps":
        checkpoint = ModelCheckpoint(every_n_train_steps=10, save_last=True, save_top_k=0)
    else:
        checkpoint = ModelCheckpoint(save_last=True, save_top_k=1)
    callbacks = [
        ICLCurves(),
        ConceptDecodability(num_batches=2, permutations=5, bootstrap=5, k=3),
        HeadAblation(mode="mean"),
        HeadAttribution(method="training", mode="zero", every_n_steps=5, on_validation=False),  # running sums
        checkpoint,
        Die(die),
    ]
    trainer = L.Trainer(accelerator="cpu", max_steps=30, val_check_interval=10, check_val_every_n_epoch=None,
                        logger=CSVLogger(root, name="run"), log_every_n_steps=5, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        plugins=[SafeCheckpointIO()])  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt)


if __name__ == "__main__":
    main(*sys.argv[1:])
