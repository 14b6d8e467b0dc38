"""``lightning-icl prune`` and ``lightning-icl core``: subnetworks of a trained checkpoint.

``prune`` learns one subnetwork (:class:`~lightning_icl.pruning.SubnetworkPruning`) at one
target sparsity and seed and writes ``mask.json``. ``core`` runs ``prune`` over sparsities x
seeds and writes the heuristic core of the subnetworks (:mod:`lightning_icl.pruning.core`): a table
of runs (CSV and markdown), the keep frequency of every head, the core, the effective size and
a heatmap of the keep frequency.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lightning_icl.checkpoints import load_trained
from lightning_icl.module import ICLModule
from lightning_icl.tasks.base import ICLDataModule, TrainStream, derive_seed

from .core import summarize_runs, write_core_report
from .module import DIVERGENCES, WEIGHTINGS, SubnetworkPruning


def pruning_loader(data: ICLDataModule, seed: int) -> DataLoader:
    """Training batches of ``data``'s tasks from a stream of their own, one per pruning seed."""
    stream = TrainStream(data.train_sampler(), derive_seed(data.seed, "prune", seed))
    return DataLoader(stream, batch_size=None, num_workers=0)


# ---- one subnetwork ---------------------------------------------------------------------
def check_prune_arguments(
    module: ICLModule, sparsity: float, steps: int, warmup_steps: int | None, val_every: int | None, **pruning_kwargs
) -> int:
    """Raise ``ValueError`` naming a bad argument of :func:`prune` (before any training); returns
    the warm-up length (default: half of ``steps``)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    warmup_steps = steps // 2 if warmup_steps is None else warmup_steps
    if warmup_steps > steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be <= steps ({steps}): the target sparsity would never be reached"
        )
    if val_every is not None and val_every < 1:
        raise ValueError(f"val_every must be >= 1 or None, got {val_every}")
    SubnetworkPruning(module, target_sparsity=sparsity, warmup_steps=warmup_steps, **pruning_kwargs)  # its own checks
    return warmup_steps


def prune(
    module: ICLModule,
    data: ICLDataModule,
    out: str,
    sparsity: float = 0.5,
    seed: int = 0,
    steps: int = 500,
    warmup_steps: int | None = None,
    val_every: int | None = None,
    accelerator: str = "auto",
    progress: bool = True,
    **pruning_kwargs,
) -> dict:
    """Learn one subnetwork of ``module`` and write ``out/mask.json`` (and ``out/metrics.csv``).

    ``warmup_steps`` defaults to half of ``steps``; ``pruning_kwargs`` go to
    :class:`SubnetworkPruning`. Returns the content of ``mask.json``.
    """
    warmup_steps = check_prune_arguments(module, sparsity, steps, warmup_steps, val_every, **pruning_kwargs)
    L.seed_everything(seed, verbose=False)
    pruner = SubnetworkPruning(module, target_sparsity=sparsity, warmup_steps=warmup_steps, seed=seed, **pruning_kwargs)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        val_check_interval=min(steps, val_every or max(1, steps // 4)),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=CSVLogger(out, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        log_every_n_steps=max(1, min(25, steps // 10)),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen model, on purpose
        trainer.fit(pruner, train_dataloaders=pruning_loader(data, seed), val_dataloaders=data.val_dataloader())
    return {**pruner.last_result, "steps": steps}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's per-Trainer chatter off while a sweep draws its own progress bar."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*treespec.*")  # a deprecation inside Lightning
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ---- many subnetworks: the heuristic core -------------------------------------------
def core_sweep(
    module: ICLModule,
    data: ICLDataModule,
    out: str,
    sparsities: Sequence[float] = (0.3, 0.5, 0.7),
    seeds: Sequence[int] = (0, 1, 2),
    fraction: float = 1.0,
    margin: float = 0.03,
    progress: bool = True,
    **prune_kwargs,
) -> dict:
    """:func:`prune` at every sparsity x seed (into ``out/sparsity{S}_seed{N}/``), then the summary.

    Returns the summary written to ``out/core.json``: the runs, the full model's accuracy,
    the keep frequency ``[L, H]``, the core (heads kept by at least ``fraction`` of the runs)
    and the effective size per split.
    """
    # every argument is checked before the first of many runs, not when its turn comes
    if not sparsities or not seeds:
        raise ValueError(
            f"sparsities and seeds must each hold at least one value, got {list(sparsities)} and {list(seeds)}"
        )
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    rest = {k: v for k, v in prune_kwargs.items() if k not in ("steps", "warmup_steps", "val_every", "accelerator")}
    steps = prune_kwargs.get("steps", _defaults(prune)["steps"])
    for s in sparsities:
        check_prune_arguments(module, s, steps, prune_kwargs.get("warmup_steps"), prune_kwargs.get("val_every"), **rest)
    runs = []
    grid = [(s, n) for s in sparsities for n in seeds]
    with _quiet():
        bar = tqdm(grid, desc="pruning runs", unit="run", disable=not progress)
        for s, n in bar:
            start = time.perf_counter()
            run_dir = os.path.join(out, f"sparsity{s:.2f}_seed{n}")
            result = prune(module, data, run_dir, sparsity=s, seed=n, progress=False, **prune_kwargs)
            runs.append({**result, "seconds": time.perf_counter() - start, "dir": run_dir})
            acc = ", ".join(f"{k} {v:.3f}" for k, v in result["accuracy"].items())
            bar.set_postfix_str(f"sparsity {result['sparsity']:.2f}: {acc}")
    return summarize_runs(runs, fraction=fraction, margin=margin)


# ---- command lines ----------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _defaults(fn) -> dict:
    """The default of every parameter of ``fn``: the command lines take theirs from the functions they call."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    run, masks = _defaults(prune), _defaults(SubnetworkPruning.__init__)
    parser.add_argument("--ckpt", required=True, help="ICLModule checkpoint (from lightning-icl fit)")
    parser.add_argument("--steps", type=int, default=run["steps"], help="optimizer steps per subnetwork")
    parser.add_argument("--warmup_steps", type=int, default=run["warmup_steps"],
                        help="target ramp length (default: steps / 2)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=masks["lr"], help="Adam learning rate of the masks")
    parser.add_argument("--lambda_lr", type=float, default=masks["lambda_lr"], help="learning rate of the multipliers")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default=masks["weighting"],
                        help="how units count to sparsity")  # fmt: skip
    parser.add_argument("--init_log_alpha", type=float, default=masks["init_log_alpha"],
                        help="initial log alpha of every mask")  # fmt: skip
    parser.add_argument("--kl", choices=DIVERGENCES, default=masks["kl"], help="KL(pruned||full) or reverse")
    parser.add_argument("--accelerator", default=run["accelerator"])


def _pruning_kwargs(args: argparse.Namespace) -> dict:
    keys = ("steps", "warmup_steps", "lr", "lambda_lr", "weighting", "kl", "init_log_alpha", "accelerator")
    return {k: getattr(args, k) for k in keys}


def prune_main(argv: Sequence[str]) -> dict:
    parser = argparse.ArgumentParser(
        prog="lightning-icl prune", description="Learn one subnetwork of a checkpoint; write mask.json."
    )
    _add_pruning_arguments(parser)
    run = _defaults(prune)
    parser.add_argument("--sparsity", type=float, default=run["sparsity"], help="target sparsity in [0, 1)")
    parser.add_argument("--seed", type=int, default=run["seed"])
    parser.add_argument("--out", default=None, help="run directory (default: runs/prune/sparsity{S}_seed{N})")
    args = parser.parse_args(list(argv))
    out = args.out or os.path.join("runs", "prune", f"sparsity{args.sparsity:.2f}_seed{args.seed}")
    module, data = load_trained(args.ckpt)
    result = prune(module, data, out, sparsity=args.sparsity, seed=args.seed, **_pruning_kwargs(args))
    acc = ", ".join(
        f"{s} {result['accuracy'][s]:.3f} (full {result['full_accuracy'][s]:.3f})" for s in result["accuracy"]
    )
    print(f"sparsity {result['sparsity']:.3f}, kept heads {result['heads']}, MLPs {result['mlps']}; accuracy {acc}")
    print(f"wrote {os.path.join(out, 'mask.json')}")
    return result


def core_main(argv: Sequence[str]) -> dict:
    parser = argparse.ArgumentParser(
        prog="lightning-icl core", description="Subnetworks at sparsities x seeds, and their heuristic core."
    )
    _add_pruning_arguments(parser)
    sweep = _defaults(core_sweep)
    parser.add_argument("--sparsities", type=_floats, default=list(sweep["sparsities"]),
                        help="comma-separated, e.g. 0.3,0.5")  # fmt: skip
    parser.add_argument("--seeds", type=_ints, default=list(sweep["seeds"]), help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--fraction", type=float, default=sweep["fraction"],
                        help="core: heads kept by >= this fraction of runs")  # fmt: skip
    parser.add_argument("--margin", type=float, default=sweep["margin"], help="effective size: accuracy margin")
    parser.add_argument("--out", default=os.path.join("runs", "core"), help="output directory")
    args = parser.parse_args(list(argv))
    module, data = load_trained(args.ckpt)
    summary = core_sweep(
        module,
        data,
        args.out,
        sparsities=args.sparsities,
        seeds=args.seeds,
        fraction=args.fraction,
        margin=args.margin,
        **_pruning_kwargs(args),
    )
    core = ", ".join(f"L{layer}H{head}" for layer, head in summary["core"]) or "(none)"
    sizes = ", ".join(f"{s} {v:.0f}" for s, v in summary["effective_size"].items())
    print(f"heuristic core: {core}; effective size (% of the model): {sizes}")
    for path in write_core_report(summary, args.out):
        print(f"wrote {path}")
    return summary


COMMANDS = {"prune": prune_main, "core": core_main}
