"""``HFCausalLMModule``: trains any Hugging Face causal LM on the package's token ICL tasks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from lightning_icl.adapters.hooks import HFCausalLMAdapter
from lightning_icl.adapters.icl import ICLBatchScoring
from lightning_icl.capture import Capture, CaptureSpec
from lightning_icl.config import OptimizerConfig
from lightning_icl.module import ICLTaskModule
from lightning_icl.tasks.batch import ICLBatch

POSITION_FIELDS = ("max_position_embeddings", "n_positions")
"""Config fields that bound the sequence length of a Hugging Face model."""


class HFCausalLMModule(ICLTaskModule):
    """Next-token training of a Hugging Face causal LM on the answers of ICL sequences.

    Args:
        task: what the data looks like (the CLI fills it in from the DataModule's ``task_info``);
            token tasks only.
        config: the model's config as a dict with ``model_type`` (e.g. ``"llama"``, ``"gpt2"``) and
            its fields, randomly initialised; ``vocab_size`` defaults to the task's.
        pretrained: a local directory to load with ``from_pretrained`` instead (no download).
        attn_implementation: ``"lightning_icl"`` (default: every attention layer on
            :func:`~lightning_icl.kernels.capture_attention`, per-head statistics available to the
            callbacks) or any implementation transformers knows (``"sdpa"``, ``"eager"``, ...).
        optimizer: AdamW and its schedule, as :class:`~lightning_icl.ICLModule`'s (an
            :class:`~lightning_icl.config.OptimizerConfig` or a dict of its fields).

    The loss, logged metrics (``train/loss``, ``val/<split>/acc``, ``..._shot0``, ``..._last``),
    ``icl_curves.jsonl``, ICL summary, checkpoint hooks and callback support are
    :class:`~lightning_icl.ICLModule`'s. On ``"lightning_icl"`` what the kernel cannot compute
    (soft-capping, a sliding window shorter than the task's sequences, attention dropout) raises
    here, naming the config field.
    """

    def __init__(
        self,
        task: dict | None = None,
        config: dict | None = None,
        pretrained: str | None = None,
        attn_implementation: str = "lightning_icl",
        optimizer: OptimizerConfig = OptimizerConfig(),
    ) -> None:
        super().__init__()
        info = self._init_hyperparameters(task, optimizer)
        if info.kind != "tokens":
            raise ValueError(f"HFCausalLMModule trains causal LMs on token tasks; the task's sequences are {info.kind}")
        if (config is None) == (pretrained is None):
            raise ValueError("give exactly one of config (a dict with model_type) and pretrained (a local directory)")
        if not isinstance(attn_implementation, str):
            raise ValueError(f"attn_implementation must be a string, got {attn_implementation!r}")
        self.model = build_model(config, pretrained, attn_implementation, info.vocab_size)
        cfg = self.model.config
        vocab = getattr(cfg, "vocab_size", None)
        if vocab is not None and vocab < info.vocab_size:
            raise ValueError(f"config vocab_size={vocab} is smaller than the task's vocabulary ({info.vocab_size})")
        for name in POSITION_FIELDS:
            limit = getattr(cfg, name, None)
            if isinstance(limit, int) and limit < info.seq_len:
                raise ValueError(f"config {name}={limit} is shorter than the task's sequences ({info.seq_len})")
        if attn_implementation == "lightning_icl":
            from lightning_icl.hf import check_config

            check_config(cfg, seq_len=info.seq_len, training=True)
        self._init_evaluation(info)
        self._adapter: HFModuleAdapter | None = None

    def icl_adapter(self) -> HFModuleAdapter:
        """The callbacks' view of this module (one per module)."""
        if self._adapter is None:
            self._adapter = HFModuleAdapter.from_model(self, self.model)
        return self._adapter

    def forward(
        self,
        batch: ICLBatch,
        capture: CaptureSpec | None = None,
        head_gates: Tensor | None = None,
        ablate_with: str | Tensor | None = None,
    ) -> tuple[Tensor, Capture | None]:
        """Logits ``[B, T, V]``; with ``capture`` or ``head_gates`` through the adapter's hooks."""
        adapter = self.icl_adapter()
        if capture is not None or head_gates is not None:
            return adapter.forward(batch, capture=capture, head_gates=head_gates, ablate_with=ablate_with)
        with adapter.stat_inputs(batch):
            return self.model(input_ids=batch.inputs, use_cache=False).logits, None


def build_model(config: Mapping[str, Any] | None, pretrained: str | None, attn_implementation: str, vocab_size: int):
    """A causal LM from a config dict (random init) or a local directory, on ``attn_implementation``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if attn_implementation == "lightning_icl":
        import lightning_icl.hf  # noqa: F401  (registers the implementation)
    if pretrained is not None:
        return AutoModelForCausalLM.from_pretrained(
            pretrained, attn_implementation=attn_implementation, local_files_only=True
        )
    if not isinstance(config, Mapping) or "model_type" not in config:
        raise ValueError(f"config must be a dict with a model_type (e.g. 'llama'), got {config!r}")
    fields = dict(config)
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", vocab_size)
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except ValueError as err:
        raise ValueError(f"config model_type={model_type!r}: {err}") from err
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)


class HFModuleAdapter(ICLBatchScoring, HFCausalLMAdapter):
    """:class:`HFCausalLMAdapter` for :class:`HFCausalLMModule`: ``ICLBatch`` batches, whose token
    classes give ``class_mass`` and whose inputs give ``same_label_mass``."""

    key_classes = True

    @contextmanager
    def stat_inputs(self, batch: ICLBatch) -> Iterator[None]:
        """The statistics' inputs of ``batch`` for the forwards run inside."""
        saved = self._stat_inputs
        self._stat_inputs = {
            "key_class": batch.token_class,
            "num_classes": self.module.task.num_token_classes,
            "query_label": batch.inputs,
        }
        try:
            yield
        finally:
            self._stat_inputs = saved

    def forward(
        self, batch: ICLBatch, capture=None, head_gates=None, ablate_with=None
    ) -> tuple[Tensor, Capture | None]:
        with self.stat_inputs(batch):
            return self._run(batch.inputs, None, capture, head_gates, ablate_with)
