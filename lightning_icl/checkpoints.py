"""Checkpoints that are never the only copy in flight, say when they are damaged, and never
hold a diverged model; resumed runs that miss no evaluation.

- :class:`SafeCheckpointIO` writes a checkpoint to a temporary file beside its target, flushes
  it to disk and renames it over the target: the previous checkpoint stays whole until the new
  one is complete, whatever filesystem ``/tmp`` is on. ``lightning-icl fit`` uses it unless the
  Trainer is given another ``CheckpointIO``; in Python pass ``plugins=[SafeCheckpointIO()]``.
- :func:`seal` (called by :class:`~lightning_icl.ICLModule` and the callbacks when a checkpoint
  is saved) refuses to save non-finite weights and stores a digest of the weights and optimizer
  state; :func:`verify` (called when one is loaded, and by :func:`load_checkpoint`) recomputes it,
  so flipped bytes are an error instead of a silently wrong model.
- :func:`catch_up_evaluation`: Lightning saves a ``every_n_train_steps`` checkpoint *before*
  that step's validation, and a run resumed from it skips that validation. The module and the
  callbacks run it at the start of the resumed fit, so the resumed run holds every evaluation an
  uninterrupted run would.
- :class:`DivergenceError`: a non-finite loss stops the run at its step, in one line.
- :func:`load_trained` / :func:`load_datamodule`: a trained run back from its checkpoint, the
  module and the DataModule it was trained with (what ``prune``, ``core`` and the patching
  reproduction start from).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load

from lightning_icl.records import CHECKPOINT_KEY

if TYPE_CHECKING:
    from lightning_icl.module import ICLModule
    from lightning_icl.tasks import ICLDataModule


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or weights; the message names the step and the metric."""


# ---- integrity --------------------------------------------------------------------------------
def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k], f"{prefix}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{prefix}/{i}")]
    return []


def digest(checkpoint: dict) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every tensor of the weights and the
    optimizer state."""
    h = hashlib.sha256()
    for name, t in _tensors({k: checkpoint.get(k) for k in ("state_dict", "optimizer_states")}):
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def seal(checkpoint: dict, step: int | None = None) -> None:
    """Before a checkpoint is written: raise :class:`DivergenceError` when a weight is not finite
    (a diverged model must not replace the last good checkpoint), then store its digest. Once per
    checkpoint (the module and several callbacks may all call it)."""
    extra = checkpoint.setdefault(CHECKPOINT_KEY, {})
    if "digest" in extra:
        return
    weights = [t for _, t in _tensors(checkpoint.get("state_dict", {})) if t.is_floating_point()]
    if weights:
        finite = torch.stack([torch.isfinite(t).all() for t in weights]).all()
        if not bool(finite):
            bad = next(name for name, t in _tensors(checkpoint["state_dict"]) if t.is_floating_point()
                       and not bool(torch.isfinite(t).all()))  # fmt: skip
            raise DivergenceError(
                f"training diverged: weight {bad.lstrip('/')} is not finite at step "
                f"{checkpoint.get('global_step', step)}; no checkpoint written, the previous one is kept"
            )
    extra["digest"] = digest(checkpoint)


def verify(checkpoint: dict, path: str | None = None) -> None:
    """Raise ``ValueError`` when ``checkpoint`` carries a digest its tensors no longer match."""
    extra = checkpoint.get(CHECKPOINT_KEY, {}) if isinstance(checkpoint, dict) else {}
    expected = extra.get("digest")
    if expected is None or extra.get("verified") == expected:  # the module and every callback ask: hash once
        return
    if digest(checkpoint) != expected:
        where = f"checkpoint {path}" if path else "the checkpoint"
        raise ValueError(f"{where} is damaged: its weights do not match the digest saved with them")
    extra["verified"] = expected


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """Read a checkpoint file and verify it; every failure is one ``ValueError`` naming the file."""
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    try:
        checkpoint = pl_load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many kinds for a cut or foreign file
        raise ValueError(
            f"checkpoint {path} cannot be read: it is truncated or not a PyTorch checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    verify(checkpoint, path)
    return checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """Writes beside the target and renames (atomic on one filesystem); loads with the checks of
    :func:`load_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"SafeCheckpointIO takes no storage_options, got {storage_options!r}")
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        try:  # make the rename itself durable
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")


# ---- resuming ---------------------------------------------------------------------------------
def catch_up_evaluation(trainer) -> bool:
    """At the start of a resumed fit, run the validation the checkpoint's step was owed.

    Lightning writes an ``every_n_train_steps`` checkpoint at the end of the training step, before
    that step's validation, and a run resumed from it goes straight on to the next step. Called
    from ``on_train_start`` (once per fit, whoever calls first). Returns whether it validated.
    """
    if getattr(trainer, "_lightning_icl_caught_up", False):
        return False
    trainer._lightning_icl_caught_up = True
    fit_loop = trainer.fit_loop
    loop = fit_loop.epoch_loop
    try:
        owed = (
            trainer.ckpt_path is not None
            and trainer.enable_validation
            and loop.restarted_on_train_batch_end
            and loop._should_check_val_fx(fit_loop._data_fetcher)
        )
    except AttributeError:  # a Lightning without these loop internals: nothing to catch up
        return False
    if not owed:
        return False
    loop.val_loop.restarting = False  # a fresh validation, not the continuation of one
    trainer.validating = True  # as the training loop does before its own validations
    loop.val_loop.run()
    trainer.training = True
    return True


def check_finite_loss(trainer, loss: torch.Tensor | None, name: str = "train/loss") -> None:
    """Raise :class:`DivergenceError` when ``loss`` is not finite (one host sync). Under DDP the
    ranks agree first, so that all of them stop at the same step instead of some waiting forever."""
    if loss is None or not isinstance(loss, torch.Tensor):
        return
    bad = not bool(torch.isfinite(loss.detach()).all())
    if trainer.world_size > 1:
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
    if bad:
        raise DivergenceError(divergence_message(trainer, name, float(loss.detach().float().mean())))


def divergence_message(trainer, name: str, value: float) -> str:
    last = None
    callback = getattr(trainer, "checkpoint_callback", None)
    if callback is not None:
        last = getattr(callback, "last_model_path", None) or getattr(callback, "best_model_path", None) or None
    where = f"last checkpoint (from before it): {last}" if last else "no checkpoint was written before it"
    return (
        f"training diverged: {name} is {value} at step {trainer.global_step}; {where}. "
        "Try a lower learning rate, gradient clipping, or bf16-mixed instead of 16-true precision"
    )


# ---- a trained run back from its checkpoint ----------------------------------------------
def load_trained(ckpt_path: str) -> tuple[ICLModule, ICLDataModule]:
    """The :class:`~lightning_icl.ICLModule` of a checkpoint and its DataModule rebuilt from the saved hyperparameters.

    A missing, empty, truncated, damaged or foreign file is a ``ValueError`` naming it."""
    checkpoint = load_checkpoint(ckpt_path)
    if "task" not in (checkpoint.get("hyper_parameters") or {}):
        raise ValueError(f"checkpoint {ckpt_path} is not an ICLModule checkpoint (its hyperparameters hold no task)")
    from lightning_icl.module import ICLModule

    hparams = checkpoint["hyper_parameters"]
    if "transformer" in hparams:
        module = ICLModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    else:  # written when the model's and optimizer's settings were flat arguments of ICLModule
        flat = {k: v for k, v in hparams.items() if k != "task" and not k.startswith("_")}
        module = ICLModule.from_kwargs(hparams["task"], **flat)
        module.load_state_dict(checkpoint["state_dict"])
        module.on_load_checkpoint(checkpoint)
    return module, load_datamodule(ckpt_path, checkpoint)


def load_datamodule(ckpt_path: str, checkpoint: dict | None = None) -> ICLDataModule:
    """The DataModule a checkpoint was trained with, from its saved hyperparameters.

    The class is the ``_class_path`` LightningCLI stores; a checkpoint from a plain
    ``Trainer.fit`` has none, and then the package DataModule whose constructor takes the
    saved arguments is used. Batches come as :class:`ICLBatch` whatever ``batch_format`` was.
    """
    ckpt = load_checkpoint(ckpt_path) if checkpoint is None else checkpoint
    hparams = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not hparams:
        raise ValueError(f"{ckpt_path} holds no DataModule hyperparameters: was it trained with a DataModule?")
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    cls = _import_datamodule(class_path) if class_path else _datamodule_taking(hparams)
    if "batch_format" in hparams:
        hparams["batch_format"] = "icl"
    return cls(**hparams)


def _import_datamodule(class_path: str) -> type[ICLDataModule]:
    import lightning_icl
    from lightning_icl.tasks import ICLDataModule

    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name) if module_name else lightning_icl, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ICLDataModule)):
        raise ValueError(f"the checkpoint's DataModule {class_path!r} is not an ICLDataModule of this package")
    return cls


def _datamodule_taking(hparams: dict) -> type[ICLDataModule]:
    import lightning_icl
    from lightning_icl.tasks import ICLDataModule

    candidates = [
        cls
        for cls in vars(lightning_icl).values()
        if isinstance(cls, type) and issubclass(cls, ICLDataModule) and cls is not ICLDataModule
    ]
    fits = [cls for cls in candidates if set(hparams) <= set(inspect.signature(cls.__init__).parameters)]
    if len(fits) != 1:
        names = sorted(c.__name__ for c in fits)
        raise ValueError(f"cannot tell the checkpoint's DataModule from its arguments {sorted(hparams)}: {names}")
    return fits[0]
