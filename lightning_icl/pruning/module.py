"""``SubnetworkPruning``: learn which heads and MLPs of a trained model an ICL task needs.

Bhaskar, Friedman and Chen (2024): hard-concrete L0 masks on every head and every MLP of a
frozen model; a pruned unit is replaced by its mean output, so the subnetwork computes
what the full model computes with the unit's input-dependent part removed; the loss keeps the
pruned model's answer distribution close to the full model's while a Lagrangian drives the
expected sparsity to a target that ramps up linearly. Only the masks and the two multipliers
train.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from functools import partial

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_icl.capture import CaptureSpec
from lightning_icl.checks import check_choice, check_flag, check_number, check_positive
from lightning_icl.module import ICLModule
from lightning_icl.tasks.batch import ICLBatch

from .masks import HardConcrete

WEIGHTINGS = ("params", "units")
DIVERGENCES = ("pruned_full", "full_pruned")


class SubnetworkPruning(L.LightningModule):
    """Hard-concrete masks on the heads ``[L, H]`` and MLPs ``[L]`` of a trained :class:`ICLModule`.

    Loss at the answer positions: ``KL + lambda1 (t - s) + lambda2 (t - s)^2``, where

    - KL is ``KL(p_pruned || p_full) = sum p_pruned (log p_pruned - log p_full)`` by default
      (``kl="pruned_full"``, the direction Bhaskar et al. write); ``kl="full_pruned"`` gives
      ``KL(p_full || p_pruned)``, the direction their released code computes. The full
      model's distribution comes from the same frozen weights with every gate open.
    - s is the expected sparsity, ``1 - sum_u w_u P(z_u != 0) / sum_u w_u`` over heads and
      MLPs, with ``w_u`` the unit's parameter count (``weighting="params"``: a head counts
      its slices of the QKV and output projections, an MLP its two layers) or 1
      (``weighting="units"``).
    - t is the target sparsity, ramped linearly from 0 to ``target_sparsity`` over
      ``warmup_steps``.
    - lambda1, lambda2 start at 0 and are *maximised* (an Adam group with ``maximize=True``):
      while s < t, lambda1 grows and the masks are pushed to prune more.

    Each training sequence draws its own mask sample. A pruned unit outputs its mean over
    ``mean_batches`` training batches, per position (``per_position_mean``, the default,
    since a position's role in an ICL sequence is fixed) or over all positions; the means are
    computed once when training starts and kept as buffers.

    Evaluation uses the binarised subnetwork (a unit is kept when its deterministic gate
    exceeds 1/2). Logged: ``train/kl``, ``train/expected_sparsity``, ``train/target_sparsity``,
    ``train/lambda1``, ``train/lambda2``; per validation split ``val/{split}/acc`` (subnetwork)
    and ``val/{split}/full_acc``; ``val/sparsity``, ``val/kept_heads``, ``val/kept_mlps``. When
    fitting ends, :meth:`result` (the kept mask, its sparsity and per-split accuracy of the
    subnetwork and of the full model, on the Trainer's validation loaders) is written to
    ``mask.json`` in the run directory.

    Args:
        module: the trained model (token tasks only).
        target_sparsity: final target t, in [0, 1).
        warmup_steps: steps over which t ramps up from 0 (0: t from the first step).
        lr: Adam learning rate of the masks' ``log_alpha``.
        lambda_lr: learning rate of the multipliers (gradient ascent).
        weighting: ``"params"`` or ``"units"`` (how units count towards sparsity).
        kl: ``"pruned_full"`` or ``"full_pruned"``.
        mean_batches: training batches averaged for the mean activations.
        per_position_mean: a mean per position ``[T, ...]`` rather than one over all positions.
        init_log_alpha: initial ``log_alpha`` of every gate (plus N(0, 0.01) noise).
        seed: recorded in the result (seed the run with ``L.seed_everything``).
    """

    def __init__(
        self,
        module: ICLModule,
        target_sparsity: float = 0.5,
        warmup_steps: int = 0,
        lr: float = 0.1,
        lambda_lr: float = 0.1,
        weighting: str = "params",
        kl: str = "pruned_full",
        mean_batches: int = 4,
        per_position_mean: bool = True,
        init_log_alpha: float = 10.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, ICLModule):
            raise TypeError(f"module must be an ICLModule, got {type(module).__name__}")
        if not module.is_tokens:
            raise ValueError(
                "module must be trained on a token task: SubnetworkPruning scores answers by a distribution over "
                f"tokens, and this one's task is {module.task.kind!r}"
            )
        check_number("target_sparsity", target_sparsity, 0.0, 1.0, high_open=True)
        check_positive("warmup_steps", warmup_steps, minimum=0)
        for name, value in (("lr", lr), ("lambda_lr", lambda_lr)):
            check_number(name, value, low=0.0, low_open=True)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("kl", kl, DIVERGENCES)
        check_positive("mean_batches", mean_batches)
        check_flag("per_position_mean", per_position_mean)
        check_number("init_log_alpha", init_log_alpha)
        if seed is not None:
            check_positive("seed", seed, minimum=None)
        # the seed is kept out of hparams: it would clash with the DataModule's own ``seed``
        self.save_hyperparameters(ignore=["module", "seed"])
        self.seed = seed

        self.model = module.model.eval().requires_grad_(False)  # frozen: only masks and lambdas train
        self.task = module.task
        n_l, n_h, d, t = self.model.n_layers, self.model.n_heads, self.model.d_model, module.task.seq_len
        self.head_masks = HardConcrete((n_l, n_h), init_mean=init_log_alpha)
        self.mlp_masks = HardConcrete((n_l,), init_mean=init_log_alpha)
        self.lambdas = nn.Parameter(torch.zeros(2))  # lambda1, lambda2

        pos = (t,) if per_position_mean else ()
        self.register_buffer("head_mean", torch.zeros(n_l, n_h, *pos, self.model.head_dim))
        self.register_buffer("mlp_mean", torch.zeros(n_l, *pos, d))
        self.register_buffer("means_ready", torch.tensor(False))
        head_w, mlp_w = _unit_weights(self.model) if weighting == "params" else (1.0, 1.0)
        self.register_buffer("head_weight", torch.full((n_l, n_h), float(head_w)))
        self.register_buffer("mlp_weight", torch.full((n_l,), float(mlp_w)))

        self.acc = nn.ModuleDict({s: MeanMetric() for s in self.task.eval_splits})
        self.full_acc = nn.ModuleDict({s: MeanMetric() for s in self.task.eval_splits})
        self.last_eval: dict[str, float] = {}

    def train(self, mode: bool = True) -> SubnetworkPruning:
        super().train(mode)
        self.model.eval()  # the frozen model stays in eval mode whatever the Trainer asks
        return self

    # ---- mean activations -------------------------------------------------------------
    @torch.no_grad()
    def compute_means(self, batches: Iterable[ICLBatch]) -> None:
        """Mean head outputs z and MLP outputs over ``batches`` (and over ranks under DDP)."""
        n_l = self.model.n_layers
        head_sum, mlp_sum, count = torch.zeros_like(self.head_mean), torch.zeros_like(self.mlp_mean), 0
        mlp_out: dict[int, Tensor] = {}
        read = {f"blocks.{i}.hook_mlp_out": partial(mlp_out.__setitem__, i) for i in range(n_l)}
        with self.model.hooks(read):
            for batch in batches:
                batch = move_data_to_device(batch, self.device)
                _, cap = self.model(batch.inputs, capture=CaptureSpec(heads=True, positions="all"))
                t = batch.inputs.shape[1]
                for i in range(n_l):
                    z, m = cap.heads[i].float(), mlp_out[i].float()  # [B, H, T, Dh], [B, T, D]
                    if self.hparams.per_position_mean:
                        head_sum[i, :, :t] += z.sum(dim=0)
                        mlp_sum[i, :t] += m.sum(dim=0)
                    else:
                        head_sum[i] += z.sum(dim=(0, 2)) / t
                        mlp_sum[i] += m.sum(dim=(0, 1)) / t
                count += batch.inputs.shape[0]
        counts = torch.tensor(float(count), device=self.device)
        if self._trainer is not None:  # every rank's batches count
            head_sum = self.trainer.strategy.reduce(head_sum, reduce_op="sum")
            mlp_sum = self.trainer.strategy.reduce(mlp_sum, reduce_op="sum")
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        if counts.item() == 0:
            raise ValueError("compute_means got no batches")
        self.head_mean.copy_(head_sum / counts)
        self.mlp_mean.copy_(mlp_sum / counts)
        self.means_ready.fill_(True)

    def on_train_start(self) -> None:
        if not bool(self.means_ready):
            self.compute_means(itertools.islice(self.trainer.train_dataloader, self.hparams.mean_batches))

    # ---- masks and sparsity -----------------------------------------------------------
    def masked_forward(self, inputs: Tensor, head_gates: Tensor, mlp_gates: Tensor) -> Tensor:
        """Logits with heads gated by ``[L, H]``/``[B, L, H]`` and MLPs by ``[L]``/``[B, L]``, mean-ablated."""
        outputs, _ = self.model(
            inputs,
            head_gates=head_gates,
            ablate_with=self.head_mean,
            mlp_gates=mlp_gates,
            mlp_ablate_with=self.mlp_mean,
        )
        return outputs

    def expected_sparsity(self) -> Tensor:
        """``1 - E[weighted fraction of units kept]``, differentiable in the masks."""
        kept = (self.head_weight * self.head_masks.expected_l0()).sum() + (
            self.mlp_weight * self.mlp_masks.expected_l0()
        ).sum()
        return 1 - kept / (self.head_weight.sum() + self.mlp_weight.sum())

    def kept(self) -> tuple[Tensor, Tensor]:
        """The binarised subnetwork: kept heads ``[L, H]`` and kept MLPs ``[L]`` (bool)."""
        return self.head_masks.binary(), self.mlp_masks.binary()

    def sparsity(self) -> float:
        """Weighted fraction of units the binarised subnetwork prunes."""
        heads, mlps = self.kept()
        kept = (self.head_weight * heads).sum() + (self.mlp_weight * mlps).sum()
        return float(1 - kept / (self.head_weight.sum() + self.mlp_weight.sum()))

    def target_at(self, step: int) -> float:
        """The target sparsity t at ``step``: linear from 0 over ``warmup_steps``, then constant."""
        hp = self.hparams
        if hp.warmup_steps == 0:
            return hp.target_sparsity
        return hp.target_sparsity * min(1.0, step / hp.warmup_steps)

    # ---- training ---------------------------------------------------------------------
    def divergence(self, pruned: Tensor, full: Tensor) -> Tensor:
        """Mean KL over answers between the two distributions given by logits ``[N, V]``."""
        log_p, log_q = F.log_softmax(pruned.float(), dim=-1), F.log_softmax(full.float(), dim=-1)
        if self.hparams.kl == "full_pruned":
            log_p, log_q = log_q, log_p
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    def loss(self, batch: ICLBatch, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The Lagrangian of one batch, and its parts."""
        b = len(batch)
        with torch.no_grad():
            full, _ = self.model(batch.inputs)
        pruned = self.masked_forward(batch.inputs, self.head_masks.sample((b,)), self.mlp_masks.sample((b,)))
        kl = self.divergence(pruned[batch.mask], full[batch.mask])
        s = self.expected_sparsity()
        gap = self.target_at(step) - s
        lambda1, lambda2 = self.lambdas
        loss = kl + lambda1 * gap + lambda2 * gap**2
        parts = {"kl": kl, "expected_sparsity": s, "target_sparsity": s.new_tensor(self.target_at(step))}
        return loss, {**parts, "lambda1": lambda1.detach(), "lambda2": lambda2.detach()}

    def training_step(self, batch: ICLBatch, batch_idx: int) -> Tensor:
        if not bool(self.means_ready):
            raise RuntimeError("the mean activations are not computed: call compute_means(batches) first")
        loss, parts = self.loss(batch, self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "expected_sparsity", batch_size=len(batch))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        masks = [self.head_masks.log_alpha, self.mlp_masks.log_alpha]
        return torch.optim.Adam(
            [
                {"params": masks, "lr": self.hparams.lr},
                # the multipliers climb the Lagrangian: gradient ascent
                {"params": [self.lambdas], "lr": self.hparams.lambda_lr, "maximize": True},
            ]
        )

    # ---- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def _update_eval(self, batch: ICLBatch) -> None:
        heads, mlps = self.kept()
        full, _ = self.model(batch.inputs)
        pruned = self.masked_forward(batch.inputs, heads.float(), mlps.float())
        targets = batch.targets[batch.mask]
        self.acc[batch.split].update((pruned[batch.mask].argmax(-1) == targets).float())
        self.full_acc[batch.split].update((full[batch.mask].argmax(-1) == targets).float())

    def _compute_eval(self) -> dict[str, float]:
        results = {}
        for split in self.acc:
            if self.acc[split].update_called:
                results[f"{split}/acc"] = float(self.acc[split].compute())
                results[f"{split}/full_acc"] = float(self.full_acc[split].compute())
            self.acc[split].reset()
            self.full_acc[split].reset()
        heads, mlps = self.kept()
        results.update(sparsity=self.sparsity(), kept_heads=float(heads.sum()), kept_mlps=float(mlps.sum()))
        return results

    def validation_step(self, batch: ICLBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update_eval(batch)

    def on_validation_epoch_end(self) -> None:
        results = self._compute_eval()
        if self.trainer.sanity_checking:
            return
        for key, value in results.items():
            self.log(f"val/{key}", value, add_dataloader_idx=False)
        self.last_eval = results

    def evaluate(self, loaders: Iterable[Iterable[ICLBatch]]) -> dict[str, float]:
        """Accuracy of the binarised subnetwork and of the full model on every batch of ``loaders``."""
        was_training = self.training
        self.eval()
        for loader in loaders:
            for batch in loader:
                self._update_eval(move_data_to_device(batch, self.device))
        self.train(was_training)
        return self._compute_eval()

    def result(self, evaluation: dict[str, float] | None = None) -> dict:
        """The kept subnetwork and, from an :meth:`evaluate` result, its per-split accuracy."""
        heads, mlps = self.kept()
        evaluation = evaluation or {}
        splits = [s for s in self.task.eval_splits if f"{s}/acc" in evaluation]
        return {
            "heads": heads.int().tolist(),
            "mlps": mlps.int().tolist(),
            "sparsity": self.sparsity(),
            "head_sparsity": 1 - float(heads.float().mean()),
            "target_sparsity": self.hparams.target_sparsity,
            "weighting": self.hparams.weighting,
            "kl": self.hparams.kl,
            "seed": self.seed,
            "steps": self.global_step if self._trainer is not None else 0,
            "accuracy": {s: evaluation[f"{s}/acc"] for s in splits},
            "full_accuracy": {s: evaluation[f"{s}/full_acc"] for s in splits},
        }

    def on_fit_end(self) -> None:
        loaders = self.trainer.val_dataloaders
        if loaders is None:
            loaders = []
        elif not isinstance(loaders, list | tuple):
            loaders = [loaders]
        self.last_result = self.result(self.evaluate(loaders))
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero:
            out = log_dir or self.trainer.default_root_dir
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "mask.json"), "w") as f:
                json.dump(self.last_result, f, indent=1)


def _unit_weights(model: nn.Module) -> tuple[int, int]:
    """Parameters of one head (its QKV rows and output-projection columns) and of one MLP."""
    block = model.blocks[0]
    attn = sum(p.numel() for p in (*block.attn.qkv.parameters(), block.attn.proj.weight))
    return attn // model.n_heads, sum(p.numel() for p in block.mlp.parameters())
