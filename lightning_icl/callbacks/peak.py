"""``OODPeakCheckpoint``: keep the checkpoint at the peak of a metric that rises and falls.

He et al. 2024 find that deeper models generalise out of distribution only for a while: OOD
accuracy rises, peaks and decays as training goes on, so the model worth studying is the one at the
peak (early stopping), not the last. This callback is a :class:`~lightning.pytorch.callbacks.ModelCheckpoint`
on the monitored metric that also says where the peak was.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lightning_icl import plotting, records
from lightning_icl.checks import check_choice

PEAK_MONITOR = "val/ood_unseen/acc_last"


class OODPeakCheckpoint(ModelCheckpoint):
    """Track ``monitor`` at every validation and keep the checkpoint where it peaked.

    Args:
        monitor: the logged metric to follow (default: last-shot accuracy on OOD tasks with unseen
            inputs, He et al.'s out-of-distribution generalisation).
        mode: ``"max"`` (a peak) or ``"min"`` (a trough, e.g. a loss).
        filename: the checkpoint's name in ``dirpath`` (the run's ``checkpoints/`` by default).
        **kwargs: the rest of :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s arguments
            (``save_top_k`` is 1: the peak).

    Every validation appends ``{"step", "value", "peak_step", "peak_value", "peak_checkpoint"}`` to
    ``<log_dir>/ood_peak.jsonl`` and to ``history`` (kept in checkpoints, so a resumed run goes on
    from its peak). At the end of the fit one line says where the peak was and where the run ended,
    and ``<log_dir>/figures/ood_peak.png`` draws the metric over training with the peak marked.
    ``peak_step`` and ``peak_value`` hold the peak; ``best_model_path`` its checkpoint.
    """

    name = "ood_peak"

    def __init__(
        self,
        monitor: str = PEAK_MONITOR,
        mode: str = "max",
        filename: str | None = "peak-{step}",
        **kwargs: Any,
    ) -> None:
        check_choice("mode", mode, ("max", "min"))
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be the name of a logged metric, got {monitor!r}")
        if kwargs.get("save_top_k", 1) != 1:
            raise ValueError(f"save_top_k={kwargs['save_top_k']}: OODPeakCheckpoint keeps one checkpoint, the peak")
        kwargs["save_top_k"] = 1
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(monitor=monitor, mode=mode, filename=filename, **kwargs)
        self.history: list[dict[str, Any]] = []
        self.peak_step: int | None = None
        self.peak_value: float | None = None
        self._file_started = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, peak=True)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._file_started = False
        splits = getattr(getattr(pl_module, "task", None), "eval_splits", None)
        parts = self.monitor.split("/")
        if splits and len(parts) == 3 and parts[0] == "val" and parts[1] not in splits:
            raise ValueError(
                f"OODPeakCheckpoint monitor={self.monitor!r}: this task has no {parts[1]!r} split; "
                f"its splits are {list(splits)}"
            )

    def _log_dir(self, trainer: L.Trainer) -> str:
        return trainer.log_dir or trainer.default_root_dir

    def _better(self, value: float) -> bool:
        if self.peak_value is None or math.isnan(self.peak_value):
            return not math.isnan(value)
        return value > self.peak_value if self.mode == "max" else value < self.peak_value

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = None
        step = trainer.global_step
        fresh = not self.history or self.history[-1]["step"] != step  # not a resumed run's catch-up again
        if (
            not trainer.sanity_checking
            and trainer.state.fn == "fit"
            and self.monitor in trainer.callback_metrics
            and fresh
        ):
            value = float(trainer.callback_metrics[self.monitor])
            if self._better(value):
                self.peak_step, self.peak_value = step, value
            record = {
                "step": step,
                "monitor": self.monitor,
                "value": value,
                "peak_step": self.peak_step,
                "peak_value": self.peak_value,
                "peak_checkpoint": None,  # known once the checkpoint is written, below
            }
            self.history.append(record)  # before the save: the checkpoint holds this evaluation
        super().on_validation_end(trainer, pl_module)
        if record is None:
            return
        record["peak_checkpoint"] = self.best_model_path or None
        log_dir = self._log_dir(trainer)  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            records.write_history(os.path.join(log_dir, f"{self.name}.jsonl"), self.history, self._file_started)
            self._file_started = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        log_dir = self._log_dir(trainer)  # a collective under DDP: every rank asks
        if not self.history or not trainer.is_global_zero:
            return
        rank_zero_info(peak_summary(self.history))
        fig = plotting.peak_figure(self.history)
        figures = os.path.join(log_dir, "figures")
        os.makedirs(figures, exist_ok=True)
        plotting.save(fig, os.path.join(figures, f"{self.name}.png"), plotting.CURVES_DPI)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(history=self.history, peak_step=self.peak_step, peak_value=self.peak_value)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = [dict(r) for r in state_dict.get("history", [])]
        if self.history and self.history[-1]["peak_checkpoint"] is None:  # saved before its own path was known
            self.history[-1]["peak_checkpoint"] = state_dict.get("best_model_path") or None
        self.peak_step = state_dict.get("peak_step")
        self.peak_value = state_dict.get("peak_value")


def peak_summary(history: list[dict[str, Any]]) -> str:
    """One line: where ``history``'s metric peaked, and where the run ended."""
    last = history[-1]
    if last["peak_step"] is None:
        return f"{last['monitor']}: no finite value in {len(history)} evaluations"
    where = f", checkpoint {last['peak_checkpoint']}" if last["peak_checkpoint"] else ""
    return (
        f"{last['monitor']} peaked at {last['peak_value']:.4f} at step {last['peak_step']} "
        f"({last['value']:.4f} at the last evaluation, step {last['step']}){where}"
    )
