"""``lightning-icl``: LightningCLI over the package's modules and DataModules.

Two more commands read a trained checkpoint: ``lightning-icl prune`` and ``lightning-icl core``
(subnetworks and their heuristic core, :mod:`lightning_icl.pruning.cli`); ``lightning-icl report``
draws run directories (:mod:`lightning_icl.report`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import time
import traceback

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

import lightning_icl
import lightning_icl.kernels as kernels
from lightning_icl.checkpoints import DivergenceError, SafeCheckpointIO, load_checkpoint
from lightning_icl.report import callback_histories, fit_summary, write_fit_report


def _task_info(data: L.LightningDataModule) -> dict:
    info = getattr(data, "task_info", None)
    if info is None:
        raise ValueError(f"--data {type(data).__name__} has no task_info; ICLModule needs one to size the model")
    return info.as_dict()


DEFAULT_VALIDATIONS = 10
"""Validations over a step-based run that gave no schedule of its own."""


def validation_schedule(trainer_config) -> int | None:
    """The ``val_check_interval`` (in steps) to use when the run trains for ``max_steps`` but kept
    Lightning's epoch-based default: the package's training streams are one endless epoch, so
    ``val_check_interval=1.0`` would never validate. ``None``: leave the schedule alone."""
    max_steps = trainer_config.get("max_steps") or -1
    epoch_default = trainer_config.get("val_check_interval") in (None, 1.0) and trainer_config.get(
        "check_val_every_n_epoch", 1
    ) in (None, 1)
    if max_steps < 1 or not epoch_default or trainer_config.get("limit_val_batches") == 0:
        return None
    return max(1, max_steps // DEFAULT_VALIDATIONS)


class ICLCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        self.raw_args = kwargs.get("args")  # what the command line said, before parsing
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # the model is sized by the data: vocabulary, input width, sequence length, splits
        parser.link_arguments("data", "model.init_args.task", compute_fn=_task_info, apply_on="instantiate")

    def _quiet_table(self) -> None:
        """validate / test: Lightning's results table repeats epoch-level metrics under every
        loader's column; ICLModule prints its ICL summary instead (``--verbose true`` brings it back)."""
        given = sys.argv[1:] if self.raw_args is None else [str(a) for a in self.raw_args]
        if not any(a.startswith("--verbose") for a in given):
            self.config_init[self.subcommand]["verbose"] = False

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyperparameters while parsing: check the file first, so
        # that a missing, cut or damaged one is reported by name
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            load_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

    def _safe_checkpoints(self) -> None:
        """Checkpoints written beside their target and renamed, and checked when read
        (:class:`~lightning_icl.checkpoints.SafeCheckpointIO`), unless the Trainer was given its own."""
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = SafeCheckpointIO()

    def _keep_metrics_on_resume(self) -> None:
        """Resuming into the logger version a run already wrote: CSVLogger would delete that
        version's ``metrics.csv``; its rows up to the checkpoint's step are carried over instead."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        logger = self.trainer.logger
        if not ckpt_path or not os.path.isfile(str(ckpt_path)) or not isinstance(logger, CSVLogger):
            return
        path = os.path.join(logger.log_dir, "metrics.csv")
        if not os.path.exists(path):
            return
        step = load_checkpoint(str(ckpt_path)).get("global_step", 0)
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step") and float(r["step"]) <= step]
        writer = logger.experiment  # created now: it removes the old file
        for row in rows:
            values = {k: float(v) for k, v in row.items() if k not in ("step", None) and v not in (None, "")}
            writer.log_metrics(values, int(float(row["step"])))
        writer.save()

    def before_fit(self) -> None:
        self._safe_checkpoints()
        self._keep_metrics_on_resume()
        self._fit_started = time.perf_counter()

    def before_validate(self) -> None:
        self._safe_checkpoints()
        self._quiet_table()

    def before_test(self) -> None:
        self._safe_checkpoints()
        self._quiet_table()

    def before_instantiate_classes(self) -> None:
        if self.subcommand != "fit":
            return
        trainer = self.config[self.subcommand]["trainer"]
        interval = validation_schedule(trainer)
        if interval is not None:
            trainer["val_check_interval"], trainer["check_val_every_n_epoch"] = interval, None
            print(
                f"validating every {interval} steps ({DEFAULT_VALIDATIONS} times over --trainer.max_steps "
                f"{trainer['max_steps']}; the training stream is one endless epoch); set "
                "--trainer.val_check_interval to choose"
            )

    def after_fit(self) -> None:
        """The run's figures and, with a logger, its HTML report (``<log_dir>/report/index.html``), then
        what it found in a few lines (:func:`~lightning_icl.report.fit_summary`); on rank zero."""
        fit_seconds = time.perf_counter() - self._fit_started
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if not self.trainer.is_global_zero:
            return
        if log_dir is not None:  # with a logger the run has a folder of its own: its page goes there too
            for path in write_fit_report(log_dir, html=self.trainer.logger is not None):
                print(f"wrote {path}")
        histories, seconds = callback_histories(self.trainer.callbacks)
        for line in fit_summary(getattr(self.model, "last_eval", {}), histories, seconds, fit_seconds):
            print(line)


EXTRA_COMMANDS = """Besides LightningCLI's fit / validate / test / predict:
  lightning-icl prune --ckpt CKPT --sparsity S --seed N    one subnetwork of a checkpoint (mask.json)
  lightning-icl core --ckpt CKPT --sparsities ... --seeds ...    subnetworks over seeds, heuristic core
  lightning-icl report RUN_DIR [RUN_DIR ...] --out DIR    figures and an HTML page from run directories
(each takes --help)
"""


PACKAGE_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (lightning_icl, kernels))
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, DivergenceError, MisconfigurationException)


def _raised_here(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIRS)


def user_error(err: BaseException) -> BaseException | None:
    """The error a user should read in ``err``'s chain: the innermost one the package raised
    (LightningCLI and jsonargparse wrap a constructor's ``ValueError`` in their own), or
    Lightning's own configuration error. ``None``: a bug, whose traceback should be shown."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    own = [e for e in chain if isinstance(e, USER_ERRORS) and _raised_here(e)]
    if own:
        return own[-1]
    return next((e for e in chain if isinstance(e, MisconfigurationException)), None)


def _where(err: BaseException) -> str | None:
    """``--data ModularArithmeticDataModule`` (or ``--model``, a callback): whose constructor raised.
    A config's check (``TransformerConfig``, ``OptimizerConfig``) counts as its module's: the
    class jsonargparse was building when it built the config."""
    tb, found, building = err.__traceback__, None, None
    while tb is not None:
        frame = tb.tb_frame
        name = frame.f_code.co_name
        obj = frame.f_locals.get("self") if name in ("__init__", "__post_init__") else None
        here = os.path.abspath(frame.f_code.co_filename).startswith(PACKAGE_DIRS)
        if obj is not None and found is None and here and not isinstance(obj, LightningCLI):
            found = obj
        cls = frame.f_locals.get("val_class")  # jsonargparse, instantiating a subclass
        if found is None and isinstance(cls, type) and issubclass(cls, L.LightningModule | L.Callback):
            building = cls
        tb = tb.tb_next
    if found is None:
        return None
    if dataclasses.is_dataclass(found) and building is not None:
        found = building
    name = found.__name__ if isinstance(found, type) else type(found).__name__
    kind = found if isinstance(found, type) else type(found)
    group = next((g for g, base in (("--data", L.LightningDataModule), ("--model", L.LightningModule),
                                    ("--trainer.callbacks", L.Callback)) if issubclass(kind, base)), None)  # fmt: skip
    return f"{group} {name}" if group else name


def _report(err: BaseException, command: str) -> int:
    """Print a usage hint and the error (its last line); return the exit status."""
    where = _where(err)
    hint = "see --help"
    if where and where.startswith(("--data ", "--model ")):
        group, name = where.split(" ")
        hint = f"its arguments: lightning-icl {command} {group}.help {name}"
    elif isinstance(err, DivergenceError):
        hint = "the run stopped"
    print(f"lightning-icl {command}: {where + ' ' if where else ''}failed ({hint}; "
          f"LIGHTNING_ICL_TRACEBACK=1 shows the traceback)", file=sys.stderr)  # fmt: skip
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"lightning-icl: error: {message}", file=sys.stderr)
    return 1 if isinstance(err, DivergenceError) else 2


def main(args: list[str] | None = None) -> None:
    """The ``lightning-icl`` command. A bad argument or file, or a diverged run, ends in two lines
    on stderr (where, and the package's message last) and a non-zero exit status, not a traceback."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        _dispatch(args, argv)
    except Exception as err:
        shown = user_error(err)
        if shown is None or os.environ.get("LIGHTNING_ICL_TRACEBACK"):
            raise
        sys.exit(_report(shown, argv[0] if argv and not argv[0].startswith("-") else "fit"))


def _dispatch(args: list[str] | None, argv: list[str]) -> None:
    if argv and argv[0] in ("prune", "core"):
        from lightning_icl.pruning.cli import COMMANDS

        COMMANDS[argv[0]](argv[1:])
        return
    if argv and argv[0] == "report":
        from lightning_icl.report import main as report_main

        report_main(argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print(EXTRA_COMMANDS)
    ICLCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
