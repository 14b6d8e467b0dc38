"""``lightning-icl``: LightningCLI over the package's modules and DataModules.

Two more commands read a trained checkpoint: ``lightning-icl prune`` and ``lightning-icl core``
(subnetworks and their heuristic core, :mod:`lightning_icl.prune_cli`); ``lightning-icl report``
draws run directories (:mod:`lightning_icl.reports`).
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

import lightning_icl  # noqa: F401  (registers the short class names)
from lightning_icl.report import write_fit_report


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

    def before_validate(self) -> None:
        self._quiet_table()

    def before_test(self) -> None:
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
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero and log_dir is not None:
            for path in write_fit_report(log_dir):
                print(f"wrote {path}")


EXTRA_COMMANDS = """Besides LightningCLI's fit / validate / test / predict:
  lightning-icl prune --ckpt CKPT --sparsity S --seed N    one subnetwork of a checkpoint (mask.json)
  lightning-icl core --ckpt CKPT --sparsities ... --seeds ...    subnetworks over seeds, heuristic core
  lightning-icl report RUN_DIR [RUN_DIR ...] --out DIR    figures and an HTML page from run directories
(each takes --help)
"""


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in ("prune", "core"):
        from lightning_icl.prune_cli import COMMANDS

        COMMANDS[argv[0]](argv[1:])
        return
    if argv and argv[0] == "report":
        from lightning_icl.reports import main as report_main

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
