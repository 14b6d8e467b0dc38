"""What a model is and how it is trained: :class:`TransformerConfig` and :class:`OptimizerConfig`.

``ICLTransformer(TransformerConfig(...))`` builds a model; ``ICLModule(task, transformer=...,
optimizer=...)`` and ``HFCausalLMModule(task, config, optimizer=...)`` take them as arguments, so
LightningCLI reads them as nested groups (``--model.transformer.d_model 256``,
``--model.optimizer.lr 1e-3``, or ``transformer:`` / ``optimizer:`` blocks under ``init_args`` in
YAML). Every field is checked when the config is built: a bad one raises ``ValueError`` naming it.
Both are frozen: change one with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from lightning_icl.checks import (
    check_choice,
    check_flag,
    check_number,
    check_optional_positive,
    check_positive,
    is_number,
)
from lightning_icl.kernels import BACKENDS, check_head_dim
from lightning_icl.optim import SCHEDULES

POSITIONAL = ("rope", "learned", "none")
ACTIVATIONS = ("relu", "gelu")
DEFAULT_MAX_SEQ_LEN = 256
"""An ``ICLTransformer``'s context when its config leaves ``max_seq_len`` unset (``ICLModule``
uses the task's sequence length instead)."""


@dataclass(frozen=True)
class TransformerConfig:
    """The architecture of an :class:`~lightning_icl.ICLTransformer`.

    Args:
        vocab_size: number of tokens (token tasks); give this or ``input_dim``. ``ICLModule`` sets
            it from the task.
        input_dim: width of input vectors (vector tasks; linear read-in). ``ICLModule`` sets it
            from the task.
        output_dim: width of the read-out for vector tasks.
        d_model: width of the residual stream; ``d_model / n_heads`` must be a head dim the
            kernel supports.
        n_layers: number of blocks.
        n_heads: attention heads per block.
        d_mlp: MLP width (``None``: ``4 * d_model``).
        max_seq_len: longest sequence accepted (``None``: the task's sequence length in
            ``ICLModule``, 256 for a bare ``ICLTransformer``).
        positional: ``"rope"``, ``"learned"`` or ``"none"``.
        bias: biases in linear layers and layer norms.
        activation: ``"relu"`` or ``"gelu"``.
        tie_embeddings: token tasks: the unembedding is the embedding's transpose.
        init_std: std of the normal init; output projections get ``init_std / sqrt(2 n_layers)``.
        attention_backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see ``capture_attention``).
    """

    vocab_size: int = 0
    input_dim: int = 0
    output_dim: int = 1
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int | None = None
    max_seq_len: int | None = None
    positional: str = "rope"
    bias: bool = False
    activation: str = "relu"
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        check_positive("vocab_size", self.vocab_size, minimum=0)
        check_positive("input_dim", self.input_dim, minimum=0)
        if self.vocab_size > 0 and self.input_dim > 0:
            raise ValueError(self._one_of_message())
        for name in ("d_model", "n_layers", "n_heads", "output_dim"):
            check_positive(name, getattr(self, name))
        check_optional_positive("d_mlp", self.d_mlp)
        check_optional_positive("max_seq_len", self.max_seq_len)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        check_head_dim(self.head_dim, argument=f"d_model / n_heads = {self.d_model}/{self.n_heads}")
        check_choice("positional", self.positional, POSITIONAL)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("attention_backend", self.attention_backend, BACKENDS)
        check_flag("bias", self.bias)
        check_flag("tie_embeddings", self.tie_embeddings)
        check_number("init_std", self.init_std, low=0.0)

    def _one_of_message(self) -> str:
        return (
            "give exactly one of vocab_size (token tasks) and input_dim (vector tasks), "
            f"got vocab_size={self.vocab_size}, input_dim={self.input_dim}"
        )

    def check_sizes(self) -> None:
        """Raise unless exactly one of ``vocab_size`` and ``input_dim`` is set (what a model needs)."""
        if (self.vocab_size > 0) == (self.input_dim > 0):
            raise ValueError(self._one_of_message())

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_width(self) -> int:
        return 4 * self.d_model if self.d_mlp is None else self.d_mlp

    @property
    def context(self) -> int:
        """``max_seq_len``, or the default context when it is unset."""
        return DEFAULT_MAX_SEQ_LEN if self.max_seq_len is None else self.max_seq_len


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a linear warm-up and a cosine or constant learning-rate schedule.

    Args:
        lr: peak learning rate.
        betas, eps: AdamW's (two numbers in [0, 1); > 0).
        weight_decay: on matrices, embeddings included; none on norms and biases.
        warmup_steps, warmup_start_factor: linear warm-up from ``warmup_start_factor * lr`` (in
            [0, 1]) over ``warmup_steps``, which may not exceed ``total_steps`` nor
            ``trainer.max_steps`` (checked when the fit starts).
        schedule: ``"cosine"`` (down to ``min_lr_factor * lr`` at ``total_steps``) or ``"constant"``.
        min_lr_factor: where the cosine ends, as a fraction of ``lr`` (in [0, 1]).
        total_steps: length of the cosine (``None``: ``trainer.max_steps``).
        fused: PyTorch's fused AdamW (one kernel for every parameter update); ``None``: fused
            when every parameter is on a CUDA device, the multi-tensor AdamW otherwise.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    schedule: str = "cosine"
    min_lr_factor: float = 0.1
    total_steps: int | None = None
    fused: bool | None = None

    def __post_init__(self) -> None:
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_betas(self.betas)
        object.__setattr__(self, "betas", tuple(self.betas))  # a list from YAML; frozen
        check_number("eps", self.eps, low=0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_positive("warmup_steps", self.warmup_steps, minimum=0)
        check_number("warmup_start_factor", self.warmup_start_factor, 0.0, 1.0)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_number("min_lr_factor", self.min_lr_factor, 0.0, 1.0)
        check_optional_positive("total_steps", self.total_steps)
        if self.fused is not None:
            check_flag("fused", self.fused)
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} is longer than total_steps={self.total_steps}")


def check_betas(betas: tuple[float, float]) -> None:
    """AdamW's ``betas``: two numbers in [0, 1)."""
    pair = list(betas) if isinstance(betas, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(is_number(b) and 0 <= b < 1 for b in pair):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


Config = TypeVar("Config")


def as_config(cls: type[Config], value: Config | Mapping | None, name: str) -> Config:
    """``value`` as the dataclass ``cls``: an instance, a dict of its fields (as checkpoints and
    ``hparams.yaml`` keep it), or ``None`` for the defaults. An unknown field raises, naming it."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__} {value!r}"
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields, key=str)
    if unknown:
        raise ValueError(f"{name} has fields {unknown} that a {cls.__name__} does not; its fields are {sorted(fields)}")
    return cls(**value)


def as_dict(config: TransformerConfig | OptimizerConfig) -> dict:
    """The plain-value dict of a config (lists for tuples), as kept in checkpoints and hparams.yaml."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def split_fields(fields: Mapping) -> tuple[dict, dict]:
    """Flat keywords split into the fields of a :class:`TransformerConfig` and of an
    :class:`OptimizerConfig` (no name is in both); one that is in neither raises, naming it."""
    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (TransformerConfig, OptimizerConfig)}
    unknown = sorted(set(fields) - names[TransformerConfig] - names[OptimizerConfig], key=str)
    if unknown:
        known = sorted(names[TransformerConfig] | names[OptimizerConfig])
        raise ValueError(f"{unknown} are fields of neither TransformerConfig nor OptimizerConfig; they are {known}")
    return tuple({k: v for k, v in fields.items() if k in names[cls]} for cls in (TransformerConfig, OptimizerConfig))
