"""``ICLModule``: trains an :class:`ICLTransformer` on any ICL task and logs ICL curves."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Mapping

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_icl import records
from lightning_icl.capture import Capture, CaptureSpec
from lightning_icl.checkpoints import DivergenceError, catch_up_evaluation, check_finite_loss, seal, verify
from lightning_icl.checks import check_choice
from lightning_icl.config import OptimizerConfig, TransformerConfig, as_config, as_dict, split_fields
from lightning_icl.metrics import PerShotMean
from lightning_icl.models import ICLTransformer
from lightning_icl.optim import configure_adamw
from lightning_icl.tasks.base import TaskInfo
from lightning_icl.tasks.batch import ICLBatch

COMPILE_MODES = ("auto", "off", "default", "reduce-overhead", "max-autotune")
"""``compile``: ``off``, a ``torch.compile`` mode (``reduce-overhead`` adds CUDA graphs), or ``auto``
(``default`` on CUDA, ``off`` elsewhere)."""


def resolve_compile(mode: str, device: torch.device) -> str:
    """The ``torch.compile`` mode ``mode`` means on ``device`` (``"off"``: eager)."""
    check_choice("compile", mode, COMPILE_MODES)
    if mode == "auto":
        return "default" if device.type == "cuda" else "off"
    return mode


def has_hooks(modules: list[nn.Module]) -> bool:
    """Whether any forward or backward hook is registered on ``modules`` or globally (a compiled
    graph would not run a hook registered after it was traced)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules)


class ICLTaskModule(L.LightningModule):
    """What every module that trains a model on the package's ICL tasks shares.

    The answer loss on the scored positions, ``train/loss`` and ``train/acc``, the per-split,
    per-shot evaluation (``{stage}/{split}/{metric}``, ``_shot0``, ``_last``), ``icl_curves.jsonl``,
    the ICL summary, the evaluation history kept in checkpoints and the divergence checks, and
    AdamW with warm-up and a cosine or constant schedule (an :class:`OptimizerConfig`). Subclasses
    build ``self.model`` in ``__init__`` (after :meth:`_init_hyperparameters` and
    :meth:`_init_evaluation`) and implement
    ``forward(batch, capture=None, **kwargs) -> (outputs [B, T, V], capture)``.
    """

    def _keep_plain(self, key: str, value: dict) -> None:
        """Keep hyperparameter ``key`` as a plain dict, so checkpoints and hparams.yaml stay portable."""
        self.hparams[key] = value
        if getattr(self, "_hparams_initial", None) is not None:  # what loggers write (hparams.yaml): it too
            self._hparams_initial[key] = value

    def _keep_task(self, info: TaskInfo) -> None:
        self._keep_plain("task", info.as_dict())

    def _init_hyperparameters(self, task: TaskInfo | Mapping | None, optimizer: OptimizerConfig | Mapping) -> TaskInfo:
        """Save the arguments of the subclass's ``__init__`` (the caller) as hyperparameters, the task
        and the optimizer as plain dicts; keep the optimizer for :meth:`configure_optimizers`.
        Returns the task."""
        info = as_task_info(task)
        self.save_hyperparameters(ignore=["task"], frame=inspect.currentframe().f_back)
        self._keep_task(info)
        self.optimizer_config = as_config(OptimizerConfig, optimizer, "optimizer")
        self._keep_plain("optimizer", as_dict(self.optimizer_config))
        return info

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

    # ---- the compiled training forward -------------------------------------------------
    def _init_compile(self, mode: str) -> None:
        check_choice("compile", mode, COMPILE_MODES)
        self.compile_mode = mode
        self.__dict__["_compiled"] = None  # not a submodule: state_dict and checkpoints stay the model's

    def on_fit_start(self) -> None:
        mode = resolve_compile(getattr(self, "compile_mode", "off"), self.device)
        if mode != "off":
            self.__dict__["_compiled"] = torch.compile(self.model, mode=mode, dynamic=False)
            self.__dict__["_compiled_modules"] = list(self.model.modules())
            rank_zero_info(f"training forward compiled with torch.compile(mode={mode!r}); evaluation runs eager")

    def teardown(self, stage: str) -> None:
        self.__dict__["_compiled"] = None

    def compiled_model(self):
        """The compiled model for this training forward, or ``None`` for eager: evaluation, a forward
        that captures, gates or patches, and any step on which a hook is registered on the model
        (a callback's capture) run eager, so every hook runs."""
        compiled = self.__dict__.get("_compiled")
        if compiled is None or not self.training or has_hooks(self.__dict__["_compiled_modules"]):
            return None
        return compiled

    def run_compiled(self, compiled, *args):
        """``compiled(*args)``; if compiling fails, one warning and the model runs eager from then on."""
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise  # not the compiler's failure: the eager model would not fit either
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            rank_zero_warn(
                f"torch.compile(mode={resolve_compile(self.compile_mode, self.device)!r}) failed "
                f"({type(err).__name__}: {first[:200]}); training continues eager (compile='off' skips compiling)"
            )
            self.__dict__["_compiled"] = None
            return self.model(*args)

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
        return configure_adamw(self.model, self.optimizer_config, self.trainer.max_steps)


class ICLModule(ICLTaskModule):
    """Next-token / regression training on the scored positions of ICL sequences.

    Args:
        task: what the data looks like (a :class:`TaskInfo` or its dict); the CLI fills it
            in from the DataModule's ``task_info``.
        transformer: the :class:`ICLTransformer` (a :class:`~lightning_icl.config.TransformerConfig`
            or a dict of its fields). The task sets ``vocab_size`` / ``input_dim``; ``max_seq_len``
            defaults to the task's sequence length.
        optimizer: AdamW and its schedule (an :class:`~lightning_icl.config.OptimizerConfig` or a
            dict of its fields).
        compile: the training forward under ``torch.compile``: ``"off"``, ``"default"``,
            ``"reduce-overhead"`` (with CUDA graphs), ``"max-autotune"``, or ``"auto"``
            (``"default"`` on CUDA, ``"off"`` elsewhere). Evaluation, and any training step on which a
            callback captures or gates (a hook on the model), run eager; if compiling fails the fit
            warns once and trains eager.

    From the command line: ``--model.transformer.d_model 256 --model.optimizer.lr 1e-3``, or
    ``transformer:`` and ``optimizer:`` blocks under ``init_args`` in YAML. From Python,
    :meth:`from_kwargs` takes the fields of both as flat keywords. Every argument is checked when
    its config is built: a bad one raises ``ValueError`` naming it before anything is built.

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
        transformer: TransformerConfig = TransformerConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        compile: str = "auto",
    ) -> None:
        super().__init__()
        info = self._init_hyperparameters(task, optimizer)
        self._init_compile(compile)
        config = as_config(TransformerConfig, transformer, "transformer")
        self._keep_plain("transformer", as_dict(config))
        sizes = {
            "vocab_size": info.vocab_size if info.kind == "tokens" else 0,
            "input_dim": info.input_dim if info.kind == "vectors" else 0,
        }
        for name, value in sizes.items():
            if getattr(config, name) not in (0, value):
                raise ValueError(
                    f"the transformer's {name}={getattr(config, name)} but the task's is {value}: "
                    f"the task sets {name}, leave it unset"
                )
        max_seq_len = info.seq_len if config.max_seq_len is None else config.max_seq_len
        if info.seq_len > max_seq_len:
            raise ValueError(
                f"the task's sequences have {info.seq_len} positions, longer than max_seq_len={max_seq_len}"
            )
        self.task = info
        self.model = ICLTransformer(dataclasses.replace(config, **sizes, max_seq_len=max_seq_len))
        self._init_evaluation(info)

    @classmethod
    def from_kwargs(cls, task: TaskInfo | Mapping | None = None, compile: str = "auto", **fields) -> ICLModule:
        """An ``ICLModule`` from the fields of its two configs as flat keywords:
        ``ICLModule.from_kwargs(task, d_model=64, n_layers=2, lr=3e-3)``."""
        transformer, optimizer = split_fields(fields)
        return cls(task, TransformerConfig(**transformer), OptimizerConfig(**optimizer), compile=compile)

    # ---- forward and loss -------------------------------------------------------------
    def forward(self, batch: ICLBatch, capture: CaptureSpec | None = None, **kwargs) -> tuple[Tensor, Capture | None]:
        if capture is None and not kwargs and (compiled := self.compiled_model()) is not None:
            return self.run_compiled(compiled, batch.inputs)
        extra = {}
        if capture is not None and capture.stats:
            extra = {
                "key_class": batch.token_class,
                "num_classes": self.task.num_token_classes,
                "labels": batch.inputs if self.is_tokens else batch.token_class,
            }
        return self.model(batch.inputs, capture=capture, **extra, **kwargs)


def as_task_info(task: TaskInfo | Mapping | None) -> TaskInfo:
    """The :class:`TaskInfo` of ``ICLModule``'s ``task`` argument (a TaskInfo or the dict of its fields)."""
    if task is None:
        raise ValueError("task is required: pass the DataModule's task_info (the CLI links it from --data)")
    return as_config(TaskInfo, task, "task")


def summarize(results: dict[str, float]) -> str:
    """One line per split and metric: overall, zero-shot and last-shot values."""
    lines = ["ICL summary (value over all shots | first shot -> last shot):"]
    for key in sorted(k for k in results if not k.endswith(("_shot0", "_last"))):
        lines.append(
            f"  {key:<28} {results[key]:8.4f} | {results[key + '_shot0']:8.4f} -> {results[key + '_last']:8.4f}"
        )
    return "\n".join(lines)
