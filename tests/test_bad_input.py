"""Every bad argument of a public constructor or function fails at once, with an error naming it.

One table of cases: each builds a call that differs from a valid one (the baselines below, which
``test_the_baselines_are_valid`` builds) in one argument or one combination of arguments, and
names the argument(s) the message must contain. Cases that can only be known when a fit starts
(``warmup_steps`` past ``trainer.max_steps``, a callback's ``num_batches`` past what the validation
loader holds) run the fit and must fail before the first step.
"""

from __future__ import annotations

import re
import signal
import tempfile
from contextlib import contextmanager
from functools import cache

import lightning as L
import pytest
import torch

from conftest import tiny_modular, tiny_module
from lightning_icl import (
    AttentionStatistics,
    CaptureSpec,
    CircuitOverlap,
    ConceptDecodability,
    ConceptPatching,
    HeadAblation,
    HeadAttribution,
    ICLCurves,
    ICLModule,
    ICLTransformer,
    LinearRegressionDataModule,
    MultiFamilyDataModule,
    SparseLinearRegressionDataModule,
    SubnetworkPruning,
    TaskInfo,
)
from lightning_icl.adapters import ICLModuleAdapter
from lightning_icl.interventions import ablate_with, ablation_effects, head_attribution
from lightning_icl.interventions.patching import concept_means, concept_patching, function_vector_effects, zero_shot
from lightning_icl.kernels import attention_probability, capture_attention
from lightning_icl.metrics import KNNDecodability, PerShotMean, per_shot_mean
from lightning_icl.metrics.functional import (
    concept_decodability,
    decodability_baselines,
    knn_predict,
    ridge_probe_accuracy,
)
from lightning_icl.optim import decay_groups, lr_factor
from lightning_icl.pruning import HardConcrete, effective_size, heuristic_core, keep_frequency
from lightning_icl.tasks import BitwiseDataModule

NAN, INF = float("nan"), float("inf")


# ---- valid baselines, built once --------------------------------------------------------------
@cache
def data():
    return tiny_modular()


@cache
def module():
    torch.manual_seed(0)
    return tiny_module(data())


@cache
def adapter():
    return ICLModuleAdapter(module())


@cache
def batch():
    return next(iter(data().val_dataloader()[0]))


@cache
def means():
    return concept_means(adapter(), [batch()])


def info(**changes) -> dict:
    return {**data().task_info.as_dict(), **changes}


def qkv(dtype=torch.float32, t: int = 8, d: int = 16):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, t, d, generator=g).to(dtype) for _ in range(3))


def attend(**kwargs):
    """``capture_attention`` on the baseline q, k, v with ``kwargs`` changed (``q``, ``k``, ``v`` too)."""
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, **kwargs}
    return capture_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def with_nan(x: torch.Tensor, value: float = NAN) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 3, 0] = value
    return x


def sparse(**kwargs):
    return SparseLinearRegressionDataModule(**{"dim": 8, "num_bases": 2, "rank": 2, "num_shots": 4, **kwargs})


def bitwise(**kwargs):
    return BitwiseDataModule(**{"n_bits": 3, "num_shots": 8, "batch_size": 14, **kwargs})


def linear(**kwargs):
    return LinearRegressionDataModule(**{"dim": 8, "num_points": 9, "dim_start": 2, "points_start": 3, **kwargs})


def multi(**kwargs):
    families = {"a": tiny_modular(), "b": tiny_modular(seed=1)}
    return MultiFamilyDataModule(**{"families": families, "batch_size": 16, **kwargs})


def model(**kwargs):
    return ICLTransformer(**{"vocab_size": 7, "d_model": 32, "n_layers": 2, "n_heads": 2, **kwargs})


def icl_module(**kwargs):
    return ICLModule.from_kwargs(**{"task": data().task_info, "d_model": 32, "n_layers": 2, "n_heads": 2, **kwargs})


def spec(**kwargs):
    """A capture spec, used on the baseline model and batch (where some arguments are resolved)."""
    capture = CaptureSpec(**{"residual": True, **kwargs})
    module()(batch(), capture=capture)
    return capture


def fit(callbacks=(), lightning_module=None, max_steps: int = 2, **trainer):
    """A tiny fit of the baseline module (2 held-out batches per loader)."""
    with tempfile.TemporaryDirectory() as root:
        kwargs = dict(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            val_check_interval=max_steps,
            check_val_every_n_epoch=None,
            limit_val_batches=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=list(callbacks),
        )
        trainer = L.Trainer(**{**kwargs, **trainer})
        trainer.fit(lightning_module or tiny_module(data(), warmup_steps=0), data())
    return trainer


def masks_record(**changes) -> dict:
    return {"target_sparsity": 0.5, "sparsity": 0.5, "accuracy": {"id_seen": 0.9}, **changes}


def vector_module():
    task = sparse().task_info
    return ICLModule.from_kwargs(task=task, d_model=32, n_layers=2, n_heads=2)


# ---- the table: (case id, argument name(s) the message names, the bad call) ---------------------
TASKS = [
    ("modular-p-not-prime", "p", lambda: tiny_modular(p=8)),
    ("modular-p-too-small-for-rectangles", "p", lambda: tiny_modular(p=2, num_tasks=4, batch_size=4)),
    ("modular-num-tasks-zero", "num_tasks", lambda: tiny_modular(num_tasks=0)),
    ("modular-num-tasks-over-p2", "num_tasks", lambda: tiny_modular(num_tasks=52, batch_size=52)),
    ("modular-num-tasks-not-multiple-of-4", "num_tasks", lambda: tiny_modular(num_tasks=6, batch_size=12)),
    ("modular-task-rule", "task_rule", lambda: tiny_modular(task_rule="grid")),
    ("modular-num-ood-tasks-negative", "num_ood_tasks", lambda: tiny_modular(num_ood_tasks=-1)),
    ("modular-alpha-zero", "alpha", lambda: tiny_modular(alpha=0.0)),
    ("modular-alpha-nan", "alpha", lambda: tiny_modular(alpha=NAN)),
    ("modular-alpha-string", "alpha", lambda: tiny_modular(alpha="0.5")),
    ("modular-num-shots-zero", "num_shots", lambda: tiny_modular(num_shots=0)),
    ("modular-batch-not-balanced", "batch_size", lambda: tiny_modular(batch_size=10)),
    ("modular-batch-size-float", "batch_size", lambda: tiny_modular(batch_size=16.0)),
    ("modular-batch-size-bool", "batch_size", lambda: tiny_modular(batch_size=True, balanced=False)),
    ("modular-eval-batch-size-zero", "eval_batch_size", lambda: tiny_modular(eval_batch_size=0)),
    ("modular-num-eval-batches-zero", "num_eval_batches", lambda: tiny_modular(num_eval_batches=0)),
    ("modular-num-workers-negative", "num_workers", lambda: tiny_modular(num_workers=-1)),
    ("modular-seed-float", "seed", lambda: tiny_modular(seed=1.5)),
    ("modular-batch-format", "batch_format", lambda: tiny_modular(batch_format="hf")),
    ("modular-balanced-string", "balanced", lambda: tiny_modular(balanced="no")),
    ("bitwise-n-bits-zero", "n_bits", lambda: bitwise(n_bits=0)),
    ("bitwise-n-bits-too-many", "n_bits", lambda: bitwise(n_bits=11)),
    ("bitwise-ops-string", "ops", lambda: bitwise(ops="AND")),
    ("bitwise-ops-unknown", "ops", lambda: bitwise(ops=["AND", "FOO"])),
    ("bitwise-ops-repeated", "ops", lambda: bitwise(ops=["AND", "AND"])),
    ("bitwise-alpha-over-1", "alpha", lambda: bitwise(alpha=1.5)),
    ("bitwise-alpha-string", "alpha", lambda: bitwise(alpha="1")),
    ("bitwise-num-shots-negative", "num_shots", lambda: bitwise(num_shots=-2)),
    ("bitwise-batch-not-balanced", "batch_size", lambda: bitwise(batch_size=10)),
    ("sparse-more-bases-than-subsets", "num_bases", lambda: sparse(dim=4, rank=4, num_bases=2, overlapping=True)),
    ("sparse-noise-nan", "noise_std", lambda: sparse(noise_std=NAN)),
    ("sparse-noise-inf", "noise_std", lambda: sparse(noise_std=INF)),
    ("sparse-noise-negative", "noise_std", lambda: sparse(noise_std=-0.1)),
    ("sparse-noise-string", "noise_std", lambda: sparse(noise_std="0.1")),
    ("sparse-rank-over-dim", "rank", lambda: sparse(dim=4, rank=5)),
    ("sparse-disjoint-bases-do-not-fit", "num_bases", lambda: sparse(dim=8, rank=4, num_bases=3)),
    ("sparse-dim-zero", "dim", lambda: sparse(dim=0)),
    ("sparse-overlapping-string", "overlapping", lambda: sparse(overlapping="false")),
    ("linear-noise-nan", "noise_std", lambda: linear(noise_std=NAN)),
    ("linear-dim-start-over-dim", "dim_start", lambda: linear(dim_start=9)),
    ("linear-points-start-over-num-points", "points_start", lambda: linear(points_start=10)),
    ("linear-interval-zero", "curriculum_interval", lambda: linear(curriculum_interval=0)),
    ("linear-dim-increment-negative", "dim_increment", lambda: linear(dim_increment=-1)),
    ("linear-num-points-float", "num_points", lambda: linear(num_points=9.5)),
    ("multi-no-families", "families", lambda: multi(families={})),
    ("multi-family-name-with-slash", "families", lambda: multi(families={"a/b": tiny_modular()})),
    ("multi-family-not-a-datamodule", "families", lambda: multi(families={"a": tiny_modular(), "b": "modular"})),
    ("multi-vector-family", "families", lambda: multi(families={"a": tiny_modular(), "b": sparse()})),
    ("multi-weights-nan", "weights", lambda: multi(weights={"a": NAN, "b": 1.0})),
    ("multi-weights-string", "weights", lambda: multi(weights={"a": "x", "b": 1.0})),
    ("multi-weights-missing-family", "weights", lambda: multi(weights={"a": 1.0})),
    ("multi-num-eval-batches-zero", "num_eval_batches", lambda: multi(num_eval_batches=0)),
    ("task-info-kind", "kind", lambda: TaskInfo(kind="pictures", seq_len=5, num_shots=2, vocab_size=3)),
    ("task-info-seq-len-zero", "seq_len", lambda: TaskInfo(kind="tokens", seq_len=0, num_shots=1, vocab_size=3)),
]

MODEL = [
    ("neither-vocab-nor-input-dim", "vocab_size", lambda: model(vocab_size=0)),
    ("both-vocab-and-input-dim", "input_dim", lambda: model(input_dim=3)),
    ("vocab-size-float", "vocab_size", lambda: model(vocab_size=7.5)),
    ("d-model-zero", "d_model", lambda: model(d_model=0)),
    ("d-model-float", "d_model", lambda: model(d_model=64.0)),
    ("n-heads-does-not-divide", "n_heads", lambda: model(n_heads=3)),
    ("head-dim-unsupported", "d_model", lambda: model(d_model=40)),
    ("n-layers-zero", "n_layers", lambda: model(n_layers=0)),
    ("n-layers-float", "n_layers", lambda: model(n_layers=2.0)),
    ("d-mlp-zero", "d_mlp", lambda: model(d_mlp=0)),
    ("d-mlp-negative", "d_mlp", lambda: model(d_mlp=-1)),
    ("max-seq-len-zero", "max_seq_len", lambda: model(max_seq_len=0)),
    ("positional", "positional", lambda: model(positional="alibi")),
    ("activation", "activation", lambda: model(activation="tanh")),
    ("attention-backend", "attention_backend", lambda: model(attention_backend="cuda")),
    ("init-std-negative", "init_std", lambda: model(init_std=-1.0)),
    ("init-std-nan", "init_std", lambda: model(init_std=NAN)),
    ("output-dim-zero", "output_dim", lambda: model(vocab_size=0, input_dim=3, output_dim=0)),
    ("bias-string", "bias", lambda: model(bias="false")),
    ("config-a-dict", "config", lambda: ICLTransformer({"vocab_size": 7})),
]

MODULE = [
    ("task-missing", "task", lambda: icl_module(task=None)),
    ("task-a-string", "task", lambda: icl_module(task="tokens")),
    ("task-unknown-field", "task", lambda: icl_module(task=info(colour=1))),
    ("task-kind", "kind", lambda: icl_module(task=info(kind="pictures"))),
    ("lr-nan", "lr", lambda: icl_module(lr=NAN)),
    ("lr-inf", "lr", lambda: icl_module(lr=INF)),
    ("lr-zero", "lr", lambda: icl_module(lr=0.0)),
    ("lr-string", "lr", lambda: icl_module(lr="1e-3")),
    ("betas-over-1", "betas", lambda: icl_module(betas=(1.5, 0.9))),
    ("betas-one-value", "betas", lambda: icl_module(betas=(0.9,))),
    ("eps-negative", "eps", lambda: icl_module(eps=-1e-8)),
    ("weight-decay-nan", "weight_decay", lambda: icl_module(weight_decay=NAN)),
    ("weight-decay-negative", "weight_decay", lambda: icl_module(weight_decay=-0.1)),
    ("warmup-steps-negative", "warmup_steps", lambda: icl_module(warmup_steps=-1)),
    ("warmup-steps-float", "warmup_steps", lambda: icl_module(warmup_steps=2.5)),
    ("warmup-start-factor-negative", "warmup_start_factor", lambda: icl_module(warmup_start_factor=-1.0)),
    ("warmup-start-factor-nan", "warmup_start_factor", lambda: icl_module(warmup_start_factor=NAN)),
    ("schedule", "schedule", lambda: icl_module(schedule="linear")),
    ("min-lr-factor-over-1", "min_lr_factor", lambda: icl_module(min_lr_factor=1.5)),
    ("total-steps-zero", "total_steps", lambda: icl_module(total_steps=0)),
    ("total-steps-negative", "total_steps", lambda: icl_module(total_steps=-5)),
    ("warmup-past-total-steps", ("warmup_steps", "total_steps"), lambda: icl_module(warmup_steps=10, total_steps=5)),
    ("max-seq-len-too-short", "max_seq_len", lambda: icl_module(max_seq_len=5)),
    ("d-mlp-negative", "d_mlp", lambda: icl_module(d_mlp=-1)),
    ("vocab-size-not-the-tasks", "vocab_size", lambda: icl_module(vocab_size=5)),
    ("input-dim-on-a-token-task", "input_dim", lambda: icl_module(input_dim=3)),
    ("flat-keyword-of-neither-config", "colour", lambda: icl_module(colour=1)),
    ("transformer-unknown-field", "colour", lambda: ICLModule(data().task_info, transformer={"colour": 1})),
    ("optimizer-a-list", "optimizer", lambda: ICLModule(data().task_info, optimizer=[1e-3])),
    (
        "warmup-past-max-steps-at-fit",
        ("warmup_steps", "max_steps"),
        lambda: fit(lightning_module=icl_module(warmup_steps=50), max_steps=5),
    ),
    ("lr-factor-schedule", "schedule", lambda: lr_factor(3, 1, 10, 0.1, 0.1, schedule="linear")),
    ("decay-groups-weight-decay-nan", "weight_decay", lambda: decay_groups(model(), NAN)),
]

KERNEL = [
    ("q-int64", "q", lambda: attend(**dict(zip("qkv", qkv(torch.int64), strict=True)))),
    ("q-not-4d", "q", lambda: attend(q=qkv()[0][0])),
    ("k-dtype-differs", "k", lambda: attend(k=qkv()[1].half())),
    ("v-shape-differs", "v", lambda: attend(v=qkv()[2][:, :, :4])),
    ("causal-lengths-differ", "causal", lambda: attend(q=qkv(t=4)[0])),
    ("causal-string", "causal", lambda: attend(causal="no")),
    ("sm-scale-zero", "sm_scale", lambda: attend(sm_scale=0.0)),
    ("sm-scale-negative", "sm_scale", lambda: attend(sm_scale=-1.0)),
    ("sm-scale-nan", "sm_scale", lambda: attend(sm_scale=NAN)),
    ("q-nan", "q", lambda: attend(q=with_nan(qkv()[0]), stats=("entropy",))),
    ("k-inf", "k", lambda: attend(k=with_nan(qkv()[1], INF))),
    ("head-dim-zero", "q", lambda: attend(**dict(zip("qkv", qkv(d=0), strict=True)))),
    ("stats-unknown", "stats", lambda: attend(stats=("entropy", "foo"))),
    ("class-mass-without-key-class", "key_class", lambda: attend(stats=("class_mass",), num_classes=3)),
    (
        "key-class-float-truncated",
        "key_class",
        lambda: attend(stats=("class_mass",), key_class=torch.full((1, 8), 1.7), num_classes=3),
    ),
    (
        "key-class-out-of-range",
        "key_class",
        lambda: attend(stats=("class_mass",), key_class=torch.full((1, 8), 3), num_classes=3),
    ),
    (
        "num-classes-float",
        "num_classes",
        lambda: attend(stats=("class_mass",), key_class=torch.zeros(1, 8, dtype=torch.long), num_classes=3.0),
    ),
    ("same-label-without-labels", "query_label", lambda: attend(stats=("same_label_mass",))),
    ("positions-float", "positions", lambda: attend(stats=("lse",), positions=torch.tensor([0.5]))),
    ("positions-out-of-range", "positions", lambda: attend(stats=("lse",), positions=torch.tensor([8]))),
    ("positions-wrong-batch", "positions", lambda: attend(stats=("lse",), positions=torch.zeros(3, 1).long())),
    ("key-padding-mask-float", "key_padding_mask", lambda: attend(key_padding_mask=torch.ones(1, 8))),
    ("key-padding-mask-shape", "key_padding_mask", lambda: attend(key_padding_mask=torch.ones(1, 7).bool())),
    ("key-padding-mask-list", "key_padding_mask", lambda: attend(key_padding_mask=[[True] * 8])),
    ("backend", "backend", lambda: attend(backend="cuda")),
    ("fp32-precision", "fp32_precision", lambda: attend(fp32_precision="fp64")),
    ("triton-head-dim", "q", lambda: attend(**dict(zip("qkv", qkv(d=8), strict=True)), backend="triton")),
    (
        "probability-key-index-float",
        "key_index",
        lambda: attention_probability(qkv()[0], qkv()[1], torch.zeros(1, 2, 8), torch.full((8,), 1.5)),
    ),
    (
        "probability-sm-scale-negative",
        "sm_scale",
        lambda: attention_probability(qkv()[0], qkv()[1], torch.zeros(1, 2, 8), torch.arange(8), sm_scale=-1.0),
    ),
    (
        "probability-lse-shape",
        "lse",
        lambda: attention_probability(qkv()[0], qkv()[1], torch.zeros(1, 2, 5), torch.arange(8)),
    ),
]

CAPTURE = [
    ("positions-mode", "positions", lambda: spec(positions="first")),
    ("positions-float-tensor", "positions", lambda: spec(positions=torch.tensor([0.5]))),
    ("positions-bool-mask", "positions", lambda: spec(positions=torch.arange(23) % 2 == 0)),
    ("positions-float-list", "positions", lambda: spec(positions=[0.5, 1])),
    ("positions-none", "positions", lambda: spec(positions=None)),
    ("positions-3d", "positions", lambda: spec(positions=torch.zeros(1, 1, 1).long())),
    ("stats-unknown", "stats", lambda: spec(stats=("foo",))),
    ("layers-float", "layers", lambda: spec(layers=[0.5])),
    ("layers-string", "layers", lambda: spec(layers=["0"])),
    ("residual-string", "residual", lambda: spec(residual="no")),
]

CALLBACKS = [
    ("every-n-steps-zero", "every_n_steps", lambda: HeadAblation(every_n_steps=0)),
    ("every-n-steps-float", "every_n_steps", lambda: HeadAblation(every_n_steps=2.5)),
    ("num-batches-zero", "num_batches", lambda: HeadAblation(num_batches=0)),
    ("num-batches-float", "num_batches", lambda: HeadAblation(num_batches=1.5)),
    ("dataloader-idx-negative", "dataloader_idx", lambda: HeadAblation(dataloader_idx=-1)),
    ("tag-with-slash", "tag", lambda: HeadAblation(tag="a/b")),
    ("ablation-top-k-zero", "top_k", lambda: HeadAblation(top_k=0)),
    ("ablation-mode", "mode", lambda: HeadAblation(mode="max")),
    ("ablation-heads-per-forward-zero", "heads_per_forward", lambda: HeadAblation(heads_per_forward=0)),
    ("attribution-steps-zero", "steps", lambda: HeadAttribution(steps=0)),
    ("attribution-steps-float", "steps", lambda: HeadAttribution(steps=1.5)),
    ("attribution-method", "method", lambda: HeadAttribution(method="shap")),
    ("attribution-training-not-zero", "mode", lambda: HeadAttribution(method="training", mode="mean")),
    ("attribution-top-k-zero", "top_k", lambda: HeadAttribution(top_k=0)),
    ("attention-every-n-steps-none", "every_n_steps", lambda: AttentionStatistics(every_n_steps=None)),
    ("attention-every-n-steps-zero", "every_n_steps", lambda: AttentionStatistics(every_n_steps=0)),
    ("attention-stats-unknown", "stats", lambda: AttentionStatistics(stats=("foo",))),
    ("attention-nothing-to-record", "stats", lambda: AttentionStatistics(stats=(), previous_token=False)),
    ("circuits-top-fraction-zero", "top_fraction", lambda: CircuitOverlap(top_fraction=0.0)),
    ("circuits-top-fraction-nan", "top_fraction", lambda: CircuitOverlap(top_fraction=NAN)),
    ("circuits-score", "score", lambda: CircuitOverlap(score="gradient")),
    ("circuits-one-family", "families", lambda: CircuitOverlap(families={"a": 0})),
    ("circuits-negative-loader", "families", lambda: CircuitOverlap(families={"a": 0, "b": -1})),
    ("circuits-families-a-list", "families", lambda: CircuitOverlap(families=[0, 1])),
    ("circuits-attribution-steps-zero", "attribution_steps", lambda: CircuitOverlap(attribution_steps=0)),
    ("circuits-attribution-steps-float", "attribution_steps", lambda: CircuitOverlap(attribution_steps=1.5)),
    ("decodability-k-zero", "k", lambda: ConceptDecodability(k=0)),
    ("decodability-k-float", "k", lambda: ConceptDecodability(k=2.5)),
    ("decodability-distance", "distance", lambda: ConceptDecodability(distance="l1")),
    ("decodability-permutations-negative", "permutations", lambda: ConceptDecodability(permutations=-1)),
    ("decodability-bootstrap-float", "bootstrap", lambda: ConceptDecodability(bootstrap=1.5)),
    ("patching-one-batch", "num_batches", lambda: ConceptPatching(num_batches=1)),
    ("patching-method", "method", lambda: ConceptPatching(method="swap")),
    ("patching-scale-nan", "scale", lambda: ConceptPatching(scale=NAN)),
    ("patching-layers-float", "layers", lambda: ConceptPatching(layers=[1.5])),
    ("curves-num-batches-zero", "num_batches", lambda: ICLCurves(num_batches=0)),
    ("curves-by-concept-string", "by_concept", lambda: ICLCurves(by_concept="no")),
    ("ablation-num-batches-past-loader-at-fit", "num_batches", lambda: fit([HeadAblation(num_batches=5)])),
    (
        "decodability-num-batches-past-loader-at-fit",
        "num_batches",
        lambda: fit([ConceptDecodability(k=2, num_batches=5, permutations=0, bootstrap=0)]),
    ),
    (
        "curves-num-batches-past-loader-at-fit",
        "num_batches",
        lambda: fit([ICLCurves(every_n_steps=1, num_batches=5)]),
    ),
]

PRUNING = [
    ("hard-concrete-beta-zero", "beta", lambda: HardConcrete((2, 2), beta=0.0)),
    ("hard-concrete-beta-nan", "beta", lambda: HardConcrete((2, 2), beta=NAN)),
    ("hard-concrete-stretch-inside", "stretch", lambda: HardConcrete((2, 2), stretch=(0.1, 1.1))),
    ("hard-concrete-stretch-one-value", "stretch", lambda: HardConcrete((2, 2), stretch=(-0.1,))),
    ("hard-concrete-init-std-negative", "init_std", lambda: HardConcrete((2, 2), init_std=-1.0)),
    ("hard-concrete-init-mean-nan", "init_mean", lambda: HardConcrete((2, 2), init_mean=NAN)),
    ("hard-concrete-shape-negative", "shape", lambda: HardConcrete((2, -1))),
    ("hard-concrete-shape-float", "shape", lambda: HardConcrete(2.5)),
    ("keep-frequency-no-masks", "masks", lambda: keep_frequency([])),
    ("keep-frequency-shapes-differ", "masks", lambda: keep_frequency([torch.ones(2, 2), torch.ones(3, 2)])),
    ("keep-frequency-not-0-1", "masks", lambda: keep_frequency([torch.full((2, 2), 2.0)])),
    ("heuristic-core-fraction-zero", "fraction", lambda: heuristic_core([torch.ones(2, 2)], fraction=0.0)),
    ("effective-size-margin-nan", "margin", lambda: effective_size([masks_record()], 0.9, margin=NAN)),
    ("effective-size-margin-negative", "margin", lambda: effective_size([masks_record()], 0.9, margin=-1.0)),
    ("effective-size-no-results", "results", lambda: effective_size([], 0.9)),
    ("effective-size-full-acc-nan", "full_acc", lambda: effective_size([masks_record()], NAN)),
    ("effective-size-split-missing", "split", lambda: effective_size([masks_record()], 0.9, split="ood_seen")),
    ("subnetwork-module", "module", lambda: SubnetworkPruning(model())),
    ("subnetwork-vector-task", "module", lambda: SubnetworkPruning(vector_module())),
    ("subnetwork-target-sparsity-1", "target_sparsity", lambda: SubnetworkPruning(module(), target_sparsity=1.0)),
    ("subnetwork-lr-nan", "lr", lambda: SubnetworkPruning(module(), lr=NAN)),
    ("subnetwork-lambda-lr-zero", "lambda_lr", lambda: SubnetworkPruning(module(), lambda_lr=0.0)),
    ("subnetwork-weighting", "weighting", lambda: SubnetworkPruning(module(), weighting="flops")),
    ("subnetwork-kl", "kl", lambda: SubnetworkPruning(module(), kl="js")),
    ("subnetwork-mean-batches-zero", "mean_batches", lambda: SubnetworkPruning(module(), mean_batches=0)),
    ("subnetwork-mean-batches-float", "mean_batches", lambda: SubnetworkPruning(module(), mean_batches=1.5)),
    ("subnetwork-warmup-negative", "warmup_steps", lambda: SubnetworkPruning(module(), warmup_steps=-1)),
    ("subnetwork-init-log-alpha-nan", "init_log_alpha", lambda: SubnetworkPruning(module(), init_log_alpha=NAN)),
]

POINTS = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
LABELS = torch.tensor([0, 0, 0, 1, 1, 1])

METRICS = [
    ("decodability-metric-k-zero", "k", lambda: KNNDecodability(k=0)),
    ("decodability-metric-k-float", "k", lambda: KNNDecodability(k=2.5)),
    ("decodability-metric-distance", "distance", lambda: KNNDecodability(distance="l1")),
    ("per-shot-mean-num-shots-zero", "num_shots", lambda: PerShotMean(num_shots=0)),
    ("per-shot-mean-num-shots-float", "num_shots", lambda: PerShotMean(num_shots=2.5)),
    ("per-shot-shot-out-of-range", "shot", lambda: per_shot_mean(torch.ones(3), torch.tensor([0, 1, 5]), 3)),
    ("per-shot-shot-float", "shot", lambda: per_shot_mean(torch.ones(3), torch.tensor([0.0, 1.5, 2.0]), 3)),
    ("decodability-k-over-points", "k", lambda: concept_decodability(POINTS, LABELS, k=6)),
    ("decodability-labels-2d", "labels", lambda: concept_decodability(POINTS, LABELS[None], k=2)),
    ("decodability-distance", "distance", lambda: concept_decodability(POINTS, LABELS, k=2, distance="l1")),
    ("baselines-level-1", "level", lambda: decodability_baselines(POINTS, LABELS, k=2, level=1.0)),
    ("baselines-permutations-zero", "permutations", lambda: decodability_baselines(POINTS, LABELS, 2, permutations=0)),
    ("ridge-nan", "ridge", lambda: ridge_probe_accuracy(POINTS, LABELS, POINTS, LABELS, ridge=NAN)),
    ("ridge-zero", "ridge", lambda: ridge_probe_accuracy(POINTS, LABELS, POINTS, LABELS, ridge=0.0)),
    ("knn-k-float", "k", lambda: knn_predict(POINTS, LABELS, k=2.5)),
]

INTERVENTIONS = [
    ("ablation-mode", "mode", lambda: ablation_effects(adapter(), batch(), mode="max")),
    ("ablation-heads-per-forward-zero", "heads_per_forward", lambda: ablation_effects(adapter(), batch(), "zero", 0)),
    (
        "ablation-heads-per-forward-float",
        "heads_per_forward",
        lambda: ablation_effects(adapter(), batch(), "zero", 1.5),
    ),
    ("ablation-gate-nan", "gate", lambda: ablation_effects(adapter(), batch(), gate=NAN)),
    ("attribution-method", "method", lambda: head_attribution(adapter(), batch(), method="shap")),
    ("attribution-steps-zero", "steps", lambda: head_attribution(adapter(), batch(), steps=0)),
    ("attribution-steps-float", "steps", lambda: head_attribution(adapter(), batch(), steps=1.5)),
    ("attribution-mode", "mode", lambda: head_attribution(adapter(), batch(), mode="max")),
    (
        "attribution-gradient-heads-per-forward-zero",
        "heads_per_forward",
        lambda: head_attribution(adapter(), batch(), method="gradient", heads_per_forward=0),
    ),
    ("ablate-with-mode", "mode", lambda: ablate_with(adapter(), batch(), "max")),
    ("patching-method", "method", lambda: concept_patching(adapter(), batch(), means(), method="swap")),
    ("patching-scale-nan", "scale", lambda: concept_patching(adapter(), batch(), means(), scale=NAN)),
    ("concept-means-layer-out-of-range", "layers", lambda: concept_means(adapter(), [batch()], layers=[5])),
    ("concept-means-no-batches", "batches", lambda: concept_means(adapter(), [])),
    (
        "function-vectors-head-means-shape",
        "head_means",
        lambda: function_vector_effects(adapter(), batch(), torch.zeros(2, 2)),
    ),
    (
        "function-vectors-heads-per-forward-zero",
        "heads_per_forward",
        lambda: function_vector_effects(adapter(), batch(), torch.zeros(2, 2, 16), heads_per_forward=0),
    ),
    ("zero-shot-not-a-batch", "batch", lambda: zero_shot("x y z")),
]

GROUPS = {
    "tasks": TASKS,
    "model": MODEL,
    "module": MODULE,
    "kernel": KERNEL,
    "capture": CAPTURE,
    "callbacks": CALLBACKS,
    "pruning": PRUNING,
    "metrics": METRICS,
    "interventions": INTERVENTIONS,
}
CASES = [(f"{group}/{case_id}", names, build) for group, cases in GROUPS.items() for case_id, names, build in cases]


@contextmanager
def deadline(seconds: int):
    """Fail a call that runs past ``seconds`` (a bad argument must never hang)."""

    def stop(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def names_in(message: str, names: str | tuple[str, ...]) -> bool:
    names = (names,) if isinstance(names, str) else names
    return all(re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) for name in names)


def test_the_table_is_large_and_its_ids_unique():
    ids = [case_id for case_id, _, _ in CASES]
    assert len(ids) >= 80 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("build, names", [(b, n) for _, n, b in CASES], ids=[c for c, _, _ in CASES])
def test_a_bad_argument_fails_at_once_naming_it(build, names):
    with deadline(60), pytest.raises((ValueError, TypeError)) as raised:
        build()
    assert names_in(str(raised.value), names), f"the message does not name {names}: {raised.value}"


def test_the_baselines_are_valid():
    """Each case changes one thing in one of these valid calls, so its error comes from that change."""
    tiny_modular(), bitwise(), sparse(), sparse(dim=4, rank=3, num_bases=4, overlapping=True), linear(), multi()
    model(), model(vocab_size=0, input_dim=3), icl_module(), spec(), spec(positions="all", stats=("entropy",))
    attend(stats=("class_mass", "lse"), key_class=torch.zeros(1, 8, dtype=torch.long), num_classes=3)
    attend(stats=("lse",), positions=torch.tensor([7]), sm_scale=0.5)
    attend(stats=("lse",), key_padding_mask=torch.ones(1, 8, dtype=torch.bool))
    attention_probability(qkv()[0], qkv()[1], torch.zeros(1, 2, 8), torch.arange(8))
    HeadAblation(), HeadAttribution(), AttentionStatistics(), CircuitOverlap(), ConceptDecodability()
    ConceptPatching(), ICLCurves(), HardConcrete((2, 2)), KNNDecodability(k=2), PerShotMean(3)
    keep_frequency([torch.ones(2, 2)]), heuristic_core([torch.ones(2, 2)])
    assert effective_size([masks_record()], 0.9) == 50.0
    SubnetworkPruning(module())
    per_shot_mean(torch.ones(3), torch.tensor([0, 1, 2]), 3), concept_decodability(POINTS, LABELS, k=2)
    ridge_probe_accuracy(POINTS, LABELS, POINTS, LABELS), knn_predict(POINTS, LABELS, k=2)
    decodability_baselines(POINTS, LABELS, k=2, permutations=2, bootstrap=2)
    lr_factor(3, 1, 10, 0.1, 0.1, schedule="cosine"), decay_groups(model(), 0.1)
    ablate_with(adapter(), batch(), "mean"), concept_means(adapter(), [batch()], layers=[1])
    head_attribution(adapter(), batch(), method="gradient")
    fit([HeadAblation(num_batches=2)], lightning_module=icl_module(warmup_steps=2), max_steps=2)
    fit([ICLCurves(num_batches=5)], max_steps=2)  # reads ICLModule's validation itself: num_batches does not apply


def test_what_a_user_means_is_accepted():
    """Inputs with one obvious meaning are taken in that meaning rather than refused."""
    as_list, as_tensor = spec(positions=[0, 5]), spec(positions=torch.tensor([0, 5]))
    assert torch.equal(as_list.positions, as_tensor.positions) and as_list.positions.dtype == torch.long
    _, from_list = module()(batch(), capture=as_list)
    _, from_tensor = module()(batch(), capture=as_tensor)
    torch.testing.assert_close(from_list.residual[1], from_tensor.residual[1])
    assert spec(positions=[[1], [2]] * 8).positions.shape == (16, 1)
    assert spec(positions=3).positions.tolist() == [3] and spec(layers=1).layers == (1,)
    assert CaptureSpec(stats="entropy").stats == ("entropy",)
    assert AttentionStatistics(stats="lse").stats == ("lse",) and ConceptPatching(layers=0).layers == [0]
    torch.testing.assert_close(attend(stats="lse")[1]["lse"], attend(stats=("lse",))[1]["lse"])


def test_value_checks_are_skipped_without_validation():
    """The model checks its inputs once per forward and runs every layer's attention with validate=False, so the
    finiteness check of q, k and v costs the training path nothing; a direct call can opt out the same way."""
    out, stats = attend(q=with_nan(qkv()[0]), stats=("entropy",), validate=False)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isnan(stats["entropy"][0, 0, 3])
