"""Shared machinery of the interpretability callbacks: cadence, held-out batches, logging, state."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_icl import records
from lightning_icl.adapters import Adapter, adapter_for
from lightning_icl.checkpoints import catch_up_evaluation, check_finite_loss, seal, verify
from lightning_icl.checks import check_flag, check_optional_positive, check_positive
from lightning_icl.metrics.functional import spearman


class ICLCallback(L.Callback):
    """Base of the metric callbacks.

    Args:
        every_n_steps: run after every N optimizer steps (``None``: never on steps).
        on_validation: run at the end of every validation (never during the sanity check).
        num_batches: held-out batches to evaluate on (from the DataModule's validation
            loader ``dataloader_idx``), shared out between DDP ranks; at most what the loader holds
            (checked when the run starts).
        dataloader_idx: which validation loader (e.g. split) to draw from.
        tag: tells apart two callbacks of one class in a Trainer (e.g. two splits): files,
            logged names and checkpoint state use ``<name>_<tag>`` instead of ``<name>``.

    A step is measured at most once: when ``every_n_steps`` and a validation fall on the same
    step, the one record serves both. Every measurement appends a record to ``history`` (saved
    with the checkpoint), to ``<log_dir>/<name>.jsonl`` and, as scalars, to the Trainer's
    loggers. ``log_dir`` is the logger's directory, or ``trainer.default_root_dir`` without a
    logger. A run's first record writes the file afresh from ``history``: a new run replaces a
    file an earlier run left in the same directory (and says so) instead of appending to it, and
    a resumed run's file holds the records restored from its checkpoint. At the end of the
    fit (or of a stand-alone validation) the latest record is drawn to
    ``<log_dir>/figures/<name>.png`` and to TensorBoard when it is a logger.

    ``seconds`` adds up the wall time this process spent measuring, recording and drawing (not
    saved in checkpoints: a resumed run counts from its own start).
    """

    name = "icl"

    def __init__(
        self,
        every_n_steps: int | None = None,
        on_validation: bool = True,
        num_batches: int = 2,
        dataloader_idx: int = 0,
        tag: str | None = None,
    ) -> None:
        check_optional_positive("every_n_steps", every_n_steps)
        check_flag("on_validation", on_validation)
        check_positive("num_batches", num_batches)
        check_positive("dataloader_idx", dataloader_idx, minimum=0)
        self.every_n_steps, self.on_validation = every_n_steps, on_validation
        self.num_batches, self.dataloader_idx = num_batches, dataloader_idx
        if tag is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
            raise ValueError(f"tag must be letters, digits, '_', '.' or '-' (it names files), got {tag!r}")
        self.tag = tag
        self.history: list[dict[str, Any]] = []
        self._adapter: Adapter | None = None
        self._warned: set[str] = set()
        self._file_started = False
        self.seconds = 0.0

    # ---- subclasses implement -----------------------------------------------------------
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Compute the metric; return a JSON-able record (scalars and nested lists)."""
        raise NotImplementedError

    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        """Which numbers of a record go to the loggers."""
        return {}

    def figure(self, record: dict[str, Any]):
        """The record's figure (drawn by a :mod:`lightning_icl.plotting` function), or None."""
        return None

    @property
    def key(self) -> str:
        """``name``, or ``name_tag``: the stem of this callback's files and logged names."""
        return self.name if self.tag is None else f"{self.name}_{self.tag}"

    @property
    def state_key(self) -> str:
        return type(self).__qualname__ if self.tag is None else f"{type(self).__qualname__}[{self.tag}]"

    # ---- checks before the run ------------------------------------------------------------
    needs_held_out = True
    """Whether the callback evaluates held-out batches (``False``: it reads the training step)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail when the run starts, not at the first measurement: the model needs an adapter, the
        held-out data must exist and have the layout the measurement reads, and the arguments
        must fit the model. Raises ``ValueError`` naming what does not fit."""
        if stage not in ("fit", "validate"):
            return
        self._file_started = False  # this run's first record rewrites the file
        adapter = self.adapter(pl_module)
        batch = None
        if self.needs_held_out and (self.on_validation or self.every_n_steps):
            loaders = self.validation_loaders(trainer)
            if self.dataloader_idx >= len(loaders):
                raise ValueError(
                    f"{type(self).__name__}: dataloader_idx={self.dataloader_idx} but there are "
                    f"{len(loaders)} validation loaders"
                )
            batch = next(iter(loaders[self.dataloader_idx]), None)
            if batch is None:
                raise ValueError(f"{type(self).__name__}: validation loader {self.dataloader_idx} is empty")
            try:
                adapter.answer_positions(batch)
            except (KeyError, AttributeError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{type(self).__name__} cannot find the answers in the held-out batches of "
                    f"{type(pl_module).__name__} (a {type(batch).__name__}): {err}"
                ) from err
            self.check_num_batches(loaders, self.held_out_loaders(trainer, pl_module))
        self.check(trainer, pl_module, adapter, batch)

    def held_out_loaders(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[int]:
        """The validation loaders a measurement reads ``num_batches`` batches from (checked at setup)."""
        return [self.dataloader_idx]

    def check_num_batches(self, loaders: list, indices: list[int]) -> None:
        """Raise when one of the loaders ``indices`` holds fewer than ``num_batches`` batches: the
        measurement would silently run on fewer points than asked for."""
        for idx in indices:
            try:
                length = len(loaders[idx])
            except TypeError:  # a loader without a length: nothing to check
                continue
            if self.num_batches > length:
                raise ValueError(
                    f"{type(self).__name__}: num_batches={self.num_batches} but validation loader {idx} holds "
                    f"{length} batch(es); lower num_batches or give the DataModule more evaluation batches "
                    "(num_eval_batches)"
                )

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, adapter: Adapter, batch: Any) -> None:
        """Subclasses: raise ``ValueError`` naming the argument that cannot work with this model
        or data. ``batch`` is the first held-out batch (``None`` when none is read)."""

    def held_out_points(self, trainer: L.Trainer, adapter: Adapter, batch: Any) -> int:
        """How many sequences the first ``num_batches`` held-out batches hold (from the first one's size)."""
        loader = self.validation_loaders(trainer)[self.dataloader_idx]
        try:
            batches = min(self.num_batches, len(loader))
        except TypeError:  # a loader without a length
            batches = self.num_batches
        return batches * adapter.batch_size(batch)

    # ---- cadence ------------------------------------------------------------------------
    def adapter(self, pl_module: L.LightningModule) -> Adapter:
        if self._adapter is None or self._adapter.module is not pl_module:
            self._adapter = adapter_for(pl_module)
        return self._adapter

    def on_train_start(self, trainer, pl_module) -> None:
        # a resumed run: its identity in run.json, and the validation its checkpoint was owed
        records.write_run_file(trainer, trainer.log_dir or trainer.default_root_dir)
        catch_up_evaluation(trainer)

    def check_loss(self, trainer, pl_module, outputs) -> None:
        """Stop a diverged run at its step (once per step, whichever callback comes first; an
        :class:`~lightning_icl.ICLModule` checks in its own training step)."""
        step = trainer.global_step
        if getattr(trainer, "_lightning_icl_loss_checked", None) != step and not hasattr(pl_module, "eval_history"):
            trainer._lightning_icl_loss_checked = step
            check_finite_loss(trainer, outputs.get("loss") if isinstance(outputs, dict) else outputs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.check_loss(trainer, pl_module, outputs)
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.on_validation and not trainer.sanity_checking:
            self._run(trainer, pl_module)
            if trainer.state.fn != "fit":  # a stand-alone validate: this is the end of the run
                self._draw(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._draw(trainer)

    @property
    def _last_step(self) -> int | None:
        return self.history[-1]["step"] if self.history else None

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_step == trainer.global_step and trainer.state.fn == "fit":
            return  # a step is measured once, also when every_n_steps and a validation fall on it
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            record = {"step": trainer.global_step, **self.measure(trainer, pl_module)}
        finally:
            pl_module.train(was_training)
        self.history.append(record)
        self._publish(trainer, record)
        self.seconds += time.perf_counter() - start

    # ---- data ---------------------------------------------------------------------------
    def validation_loaders(self, trainer: L.Trainer) -> list:
        """The validation loaders, from the DataModule when there is one, else the Trainer's."""
        loaders = None
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            loaders = trainer.datamodule.val_dataloader()
        if loaders is None:
            loaders = trainer.val_dataloaders
        if loaders is None:
            raise ValueError(f"{type(self).__name__} needs validation data: give the Trainer a val dataloader")
        return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    def eval_batches(
        self, trainer: L.Trainer, pl_module: L.LightningModule, dataloader_idx: int | None = None
    ) -> Iterator:
        """This rank's share of the first ``num_batches`` held-out batches, on the module's device.

        Batch ``i`` goes to rank ``i % world_size``, so all ranks together see exactly the
        batches one process would.
        """
        loaders = self.validation_loaders(trainer)
        idx = self.dataloader_idx if dataloader_idx is None else dataloader_idx
        if idx >= len(loaders):
            raise ValueError(f"dataloader_idx={idx} but there are {len(loaders)} validation loaders")
        loader = loaders[idx]
        rank, world = trainer.global_rank, trainer.world_size
        for i, batch in enumerate(loader):
            if i >= self.num_batches:
                break
            if i % world == rank:
                yield pl_module.transfer_batch_to_device(batch, pl_module.device, 0)

    # ---- output -------------------------------------------------------------------------
    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            rank_zero_warn(message)

    def _publish(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        scalars = {f"{self.key}/{k}": v for k, v in self.scalars(record).items()}
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=record["step"])
                logger.save()  # on disk now, as Lightning does for its own metrics: a kill loses nothing
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, f"{self.key}.jsonl")
        fresh = not self._file_started and len(self.history) == 1
        if fresh and os.path.exists(path) and os.path.getsize(path):
            self.warn_once(f"{type(self).__name__}: replaced {path}, left by an earlier run in the same directory")
        records.write_history(path, self.history, self._file_started)
        self._file_started = True

    def _draw(self, trainer: L.Trainer) -> None:
        start = time.perf_counter()
        self._draw_latest(trainer)
        self.seconds += time.perf_counter() - start

    def _draw_latest(self, trainer: L.Trainer) -> None:
        """The figure of the latest record (drawing is slow next to a small model's step, so once per run)."""
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or not self.history:
            return
        record = self.history[-1]
        fig = self.figure(record)
        if fig is None:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(self.key, fig, global_step=record["step"])
        os.makedirs(os.path.join(log_dir, "figures"), exist_ok=True)
        fig.savefig(os.path.join(log_dir, "figures", f"{self.key}.png"), dpi=150)

    # ---- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        records.save_run_id(trainer, checkpoint)
        seal(checkpoint, trainer.global_step)  # no checkpoint of a diverged model; a digest to check on load

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        verify(checkpoint, trainer.ckpt_path)
        records.load_run_id(trainer, checkpoint)


def rank_agreement_with(trainer, me, partner_type, partner_field: str, mine: torch.Tensor, step: int) -> dict[str, Any]:
    """``rank_agreement`` with the latest record of a partner callback measured at this same step, if any."""
    for callback in trainer.callbacks:
        if isinstance(callback, partner_type) and callback is not me and callback.history:
            last = callback.history[-1]
            if last["step"] == step and callback.dataloader_idx == me.dataloader_idx:
                theirs = torch.tensor(last[partner_field if partner_field in last else "loss_effect_estimate"])
                return {"rank_agreement": spearman(theirs, mine.cpu()), "rank_agreement_with": callback.key}
    return {}


def reduce_padded(trainer: L.Trainer, sums: torch.Tensor) -> torch.Tensor:
    """``sums`` added over DDP ranks, which may hold different sizes (shots, concepts): zero-padded first."""
    if trainer.world_size > 1:
        shapes = trainer.strategy.all_gather(torch.tensor(sums.shape, device=sums.device))
        longest = shapes.view(-1, sums.dim()).amax(0).tolist()
        pad = [x for d in reversed(range(sums.dim())) for x in (0, longest[d] - sums.shape[d])]
        sums = trainer.strategy.reduce(torch.nn.functional.pad(sums, pad), reduce_op="sum")
    return sums
