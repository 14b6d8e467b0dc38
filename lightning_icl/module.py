"""``ICLModule``: trains an :class:`ICLTransformer` on any ICL task and logs ICL curves."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_icl import records
from lightning_icl.capture import Capture, CaptureSpec
from lightning_icl.checkpoints import DivergenceError, catch_up_evaluation, check_finite_loss, seal, verify
from lightning_icl.checks import check_choice, check_number, check_optional_positive, check_positive, is_number
from lightning_icl.metrics import PerShotMean
from lightning_icl.models import ICLTransformer
from lightning_icl.optim import SCHEDULES, decay_groups, lr_factor
from lightning_icl.tasks.base import TaskInfo
from lightning_icl.tasks.batch import ICLBatch


class ICLTaskModule(L.LightningModule):
    """What every module that trains a model on the package's ICL tasks shares.

    The answer loss on the scored positions, ``train/loss`` and ``train/acc``, the per-split,
    per-shot evaluation (``{stage}/{split}/{metric}``, ``_shot0``, ``_last``), ``icl_curves.jsonl``,
    the ICL summary, the evaluation history kept in checkpoints and the divergence checks, and
    AdamW with warm-up and a cosine or constant schedule. Subclasses build ``self.model`` in
    ``__init__`` (after ``save_hyperparameters``, :meth:`_keep_task` and :meth:`_init_evaluation`)
    and implement ``forward(batch, capture=None, **kwargs) -> (outputs [B, T, V], capture)``.
    """

    def _keep_task(self, info: TaskInfo) -> None:
        self.hparams["task"] = info.as_dict()  # plain dict, so checkpoints and hparams.yaml stay portable
        if getattr(self, "_hparams_initial", None) is not None:  # what loggers write (hparams.yaml): the task too
            self._hparams_initial["task"] = info.as_dict()

    def _init_evaluation(self, info: TaskInfo) -> None:
        self.task = info
        self.is_tokens = info.kind == "tokens"
        names = ("loss", "acc") if self.is_tokens else ("mse",)
        self.eval_metrics = nn.ModuleDict(
            {split: nn.ModuleDict({name: PerShotMean(info.num_shots) for name in names}) for split in info.eval_splits}
        )
        self.last_eval: dict[str, float] = {}
        # every evaluation of the fit: {"step", "stage", "results", "curves"}; saved with checkpoints
        self.eval_history: list[dict] = []
        self._curves_started = False

    # ---- loss -------------------------------------------------------------------------
    def per_position_loss(self, outputs: Tensor, batch: ICLBatch) -> tuple[Tensor, Tensor | None]:
        """Loss ``[N]`` at the N scored positions (row-major), and correctness ``[N]`` for token tasks."""
        return self.answer_loss(outputs[batch.mask], batch.targets[batch.mask])

    def answer_loss(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
        """Elementwise loss (and correctness, token tasks) of ``outputs`` ``[..., V]`` against ``targets`` ``[...]``."""
        if self.is_tokens:
            loss = F.cross_entropy(outputs.flatten(0, -2).float(), targets.flatten(), reduction="none")
            return loss.view(targets.shape), (outputs.argmax(-1) == targets).float()
        return (outputs[..., 0].float() - targets.float()) ** 2, None

    def training_step(self, batch: ICLBatch, batch_idx: int) -> Tensor:
        # a callback's capture or gates reach this call through the adapter's hooks on the module
        outputs, _ = self(batch)
        loss, correct = self.per_position_loss(outputs, batch)
        loss = loss.mean()
        if self._trainer is not None:
            check_finite_loss(self.trainer, loss)  # before a checkpoint can keep a diverged step
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        if correct is not None:
            self.log("train/acc", correct.mean(), prog_bar=True, batch_size=len(batch))
        return loss

    # ---- evaluation -------------------------------------------------------------------
    def _eval_step(self, batch: ICLBatch) -> dict[str, Tensor | None]:
        outputs, _ = self(batch)
        loss, correct = self.per_position_loss(outputs, batch)
        shot = batch.shot[batch.mask]
        metrics = self.eval_metrics[batch.split]
        if self.is_tokens:
            metrics["loss"].update(loss, shot)
            metrics["acc"].update(correct, shot)
        else:
            metrics["mse"].update(loss, shot)
        # what callbacks can reuse instead of running the batch again (e.g. ICLCurves)
        return {"answer_loss": loss.detach(), "answer_correct": correct, "answer_shot": shot}

    def validation_step(self, batch: ICLBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor | None]:
        """Updates the per-shot metrics; returns the loss, correctness and shot of every answer
        (``[N]``, row-major over the batch's mask) for callbacks."""
        return self._eval_step(batch)

    def test_step(self, batch: ICLBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor | None]:
        return self._eval_step(batch)

    def _eval_epoch_end(self, stage: str) -> None:
        results, curves = {}, []
        for split, metrics in self.eval_metrics.items():
            for name, metric in metrics.items():
                if not metric.update_called:
                    continue
                by_shot = metric.compute()  # synced across ranks
                seen = (~torch.isnan(by_shot)).nonzero().squeeze(1)  # shots that have answers
                prefix = f"{stage}/{split}/{name}"
                results[prefix] = float(metric.overall())
                results[f"{prefix}_shot0"] = float(by_shot[seen[0]]) if len(seen) else math.nan
                results[f"{prefix}_last"] = float(by_shot[seen[-1]]) if len(seen) else math.nan
                curves.append(
                    {
                        "stage": stage,
                        "split": split,
                        "metric": name,
                        "by_shot": [None if math.isnan(v) else v for v in by_shot.tolist()],
                    }
                )
                metric.reset()
        if not results:
            return
        bad = [k for k, v in results.items() if not math.isfinite(v) and not k.endswith(("_shot0", "_last"))]
        if bad:
            raise DivergenceError(
                f"{bad[0]} is {results[bad[0]]} at step {self.global_step}: the model's outputs are not finite"
                + (" (a model that diverged in training)" if stage == "val" else "")
            )
        if self.trainer.sanity_checking:
            return
        for key, value in results.items():
            self.log(key, value, sync_dist=False, add_dataloader_idx=False)
        self.last_eval = results
        if self.trainer.state.fn == "fit":
            self.eval_history.append({"step": self.global_step, "stage": stage, "results": results, "curves": curves})
        self._write_curves([{"step": self.global_step, **row} for row in curves])

    def _write_curves(self, rows: list[dict]) -> None:
        """Append to ``icl_curves.jsonl``; a fit's first write rewrites it from ``eval_history``
        (a resumed run's file then holds the evaluations restored from its checkpoint)."""
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if log_dir is None or self.trainer.global_rank != 0:
            return
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, "icl_curves.jsonl")
        if not self._curves_started and self.trainer.state.fn == "fit":
            self._curves_started = True
            records.write_jsonl(path, [{"step": e["step"], **row} for e in self.eval_history for row in e["curves"]])
            return
        for row in rows:
            records.append_jsonl(path, row)

    # ---- runs that survive a crash ------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._curves_started = False

    def on_train_start(self) -> None:
        records.write_run_file(self.trainer, self.trainer.log_dir if self.trainer.logger is not None else None)
        catch_up_evaluation(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        records.save_run_id(self.trainer, checkpoint)
        checkpoint.setdefault(records.CHECKPOINT_KEY, {})["eval_history"] = self.eval_history
        seal(checkpoint, self.global_step)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        verify(checkpoint, getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None)
        if self._trainer is not None:
            records.load_run_id(self.trainer, checkpoint)
        self.eval_history = list(checkpoint.get(records.CHECKPOINT_KEY, {}).get("eval_history", []))
        if self.eval_history:
            self.last_eval = dict(self.eval_history[-1]["results"])

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_fit_end(self) -> None:
        if self.last_eval:
            rank_zero_info(summarize(self.last_eval))

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "validate" and self.last_eval:  # a stand-alone validate: its summary
            rank_zero_info(summarize(self.last_eval))

    def on_test_end(self) -> None:
        if self.last_eval:
            rank_zero_info(summarize(self.last_eval))

    # ---- optimisation -----------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            decay_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps
        )
        max_steps = self.trainer.max_steps
        if max_steps is not None and max_steps > 0 and hp.warmup_steps > max_steps:
            raise ValueError(
                f"warmup_steps={hp.warmup_steps} is longer than the run, trainer.max_steps={max_steps}: the learning "
                "rate would never reach lr; lower warmup_steps or raise max_steps"
            )
        total = hp.total_steps or max_steps
        if hp.schedule == "cosine" and (total is None or total < 1):
            raise ValueError("the cosine schedule needs total_steps or trainer.max_steps")
        factor = partial(
            lr_factor,
            warmup_steps=hp.warmup_steps,
            total_steps=total or 1,
            warmup_start_factor=hp.warmup_start_factor,
            min_lr_factor=hp.min_lr_factor,
            schedule=hp.schedule,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ICLModule(ICLTaskModule):
    """Next-token / regression training on the scored positions of ICL sequences.

    Args:
        task: what the data looks like (a :class:`TaskInfo` or its dict); the CLI fills it
            in from the DataModule's ``task_info``.
        d_model, n_layers, n_heads, d_mlp, positional, bias, activation, tie_embeddings,
            init_std, attention_backend: the :class:`ICLTransformer`.
        max_seq_len: the model's context (default: the task's sequence length).
        lr, betas, eps, weight_decay: AdamW (decay on matrices, embeddings included).
        warmup_steps, warmup_start_factor: linear warm-up from ``warmup_start_factor * lr`` (in [0, 1])
            over ``warmup_steps``, which may not exceed ``total_steps`` nor ``trainer.max_steps`` (checked
            when the fit starts).
        schedule: ``"cosine"`` (down to ``min_lr_factor * lr`` at ``total_steps``) or ``"constant"``.
        total_steps: length of the cosine (default: ``trainer.max_steps``).

    Every argument is checked here (the model's by :class:`ICLTransformer`): a bad one raises
    ``ValueError`` naming it before anything is built.

    Logged: ``train/loss`` (and ``train/acc``); per evaluation split ``{stage}/{split}/{metric}``
    over all shots, ``..._shot0`` and ``..._last``, where metric is ``loss`` and ``acc``
    (token tasks) or ``mse`` (vector tasks). Full per-shot curves go to
    ``icl_curves.jsonl`` in the logger's directory.

    Nothing is lost on a crash: every evaluation (its summary and per-shot curves) is kept in
    ``eval_history`` and saved with the checkpoint, so a resumed run's ``icl_curves.jsonl`` holds
    the whole run; a resumed fit first runs a validation its checkpoint was owed (Lightning saves
    ``every_n_train_steps`` checkpoints before that step's validation). A non-finite training
    loss or evaluation loss stops the run with a :class:`~lightning_icl.checkpoints.DivergenceError`
    naming the step, and a checkpoint with non-finite weights is never written; checkpoints carry
    a digest of their tensors that is checked when they are loaded.
    """

    def __init__(
        self,
        task: dict | None = None,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_mlp: int | None = None,
        max_seq_len: int | None = None,
        positional: str = "rope",
        bias: bool = False,
        activation: str = "relu",
        tie_embeddings: bool = True,
        init_std: float = 0.02,
        attention_backend: str = "auto",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        warmup_start_factor: float = 0.01,
        schedule: str = "cosine",
        min_lr_factor: float = 0.1,
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        info = as_task_info(task)
        self.save_hyperparameters(ignore=["task"])
        self._keep_task(info)
        check_training_args(
            lr, betas, eps, weight_decay, warmup_steps, warmup_start_factor, schedule, min_lr_factor, total_steps
        )
        check_optional_positive("max_seq_len", max_seq_len)
        max_seq_len = info.seq_len if max_seq_len is None else max_seq_len
        if info.seq_len > max_seq_len:
            raise ValueError(
                f"the task's sequences have {info.seq_len} positions, longer than max_seq_len={max_seq_len}"
            )
        self.task = info
        self.model = ICLTransformer(
            vocab_size=info.vocab_size if info.kind == "tokens" else 0,
            input_dim=info.input_dim if info.kind == "vectors" else 0,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            d_mlp=d_mlp,
            max_seq_len=max_seq_len,
            positional=positional,
            bias=bias,
            activation=activation,
            tie_embeddings=tie_embeddings,
            init_std=init_std,
            attention_backend=attention_backend,
        )
        self._init_evaluation(info)

    # ---- forward and loss -------------------------------------------------------------
    def forward(self, batch: ICLBatch, capture: CaptureSpec | None = None, **kwargs) -> tuple[Tensor, Capture | None]:
        extra = {}
        if capture is not None and capture.stats:
            extra = {
                "key_class": batch.token_class,
                "num_classes": self.task.num_token_classes,
                "labels": batch.inputs if self.is_tokens else batch.token_class,
            }
        return self.model(batch.inputs, capture=capture, **extra, **kwargs)


def check_training_args(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    warmup_start_factor: float,
    schedule: str,
    min_lr_factor: float,
    total_steps: int | None,
) -> None:
    """The optimiser and schedule arguments of the ICL modules; a bad one raises ``ValueError`` naming it."""
    check_number("lr", lr, low=0.0, low_open=True)
    check_betas(betas)
    check_number("eps", eps, low=0.0, low_open=True)
    check_number("weight_decay", weight_decay, low=0.0)
    check_positive("warmup_steps", warmup_steps, minimum=0)
    check_number("warmup_start_factor", warmup_start_factor, 0.0, 1.0)
    check_choice("schedule", schedule, SCHEDULES)
    check_number("min_lr_factor", min_lr_factor, 0.0, 1.0)
    check_optional_positive("total_steps", total_steps)
    if total_steps is not None and warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} is longer than total_steps={total_steps}")


def as_task_info(task: TaskInfo | Mapping | None) -> TaskInfo:
    """The :class:`TaskInfo` of ``ICLModule``'s ``task`` argument (a TaskInfo or the dict of its fields)."""
    if task is None:
        raise ValueError("task is required: pass the DataModule's task_info (the CLI links it from --data)")
    if isinstance(task, TaskInfo):
        return task
    if not isinstance(task, Mapping):
        raise ValueError(f"task must be a TaskInfo or a dict of its fields, got {type(task).__name__} {task!r}")
    fields = {f.name for f in dataclasses.fields(TaskInfo)}
    unknown = sorted(set(task) - fields, key=str)
    if unknown:
        raise ValueError(f"task has fields {unknown} that a TaskInfo does not; its fields are {sorted(fields)}")
    return TaskInfo(**task)


def check_betas(betas: tuple[float, float]) -> None:
    """AdamW's ``betas``: two numbers in [0, 1)."""
    pair = list(betas) if isinstance(betas, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(is_number(b) and 0 <= b < 1 for b in pair):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def summarize(results: dict[str, float]) -> str:
    """One line per split and metric: overall, zero-shot and last-shot values."""
    lines = ["ICL summary (value over all shots | first shot -> last shot):"]
    for key in sorted(k for k in results if not k.endswith(("_shot0", "_last"))):
        lines.append(
            f"  {key:<28} {results[key]:8.4f} | {results[key + '_shot0']:8.4f} -> {results[key + '_last']:8.4f}"
        )
    return "\n".join(lines)
