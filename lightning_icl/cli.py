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


class ICLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the model is sized by the data: vocabulary, input width, sequence length, splits
        parser.link_arguments("data", "model.init_args.task", compute_fn=_task_info, apply_on="instantiate")

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
