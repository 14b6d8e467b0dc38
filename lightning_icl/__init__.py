"""lightning_icl: study in-context learning inside transformers while they train.

The names here are the ones a study starts from:

- modules and models: :class:`ICLModule` (trains an :class:`ICLTransformer`),
  :class:`HFCausalLMModule` (a Hugging Face causal LM on the same tasks), and their
  configuration, :class:`TransformerConfig` and :class:`OptimizerConfig`;
- tasks: the DataModules, :class:`ICLBatch` and :class:`TaskInfo`;
- what a forward keeps: :class:`CaptureSpec` and :class:`Capture`;
- callbacks that measure during training (:class:`ICLCallback` and its subclasses), and
  :class:`OODPeakCheckpoint`, which keeps the checkpoint at the peak of OOD accuracy;
- adapters that let the callbacks and interventions reach any model (:func:`adapter_for`);
- interventions after training: :func:`ablation_effects`, :func:`head_attribution`,
  :func:`concept_patching`, :func:`function_vector_effects`;
- pruning: :class:`SubnetworkPruning` (the core's analysis is in :mod:`lightning_icl.pruning`);
- a trained run back from disk: :func:`load_trained`.

Lower-level pieces stay in their modules: the kernel in :mod:`lightning_icl.kernels`, the
metrics in :mod:`lightning_icl.metrics`, figures in :mod:`lightning_icl.plotting`, record files
in :mod:`lightning_icl.records`.
"""

from lightning_icl.adapters import Adapter, HFCausalLMAdapter, HookAdapter, ICLModuleAdapter, adapter_for
from lightning_icl.callbacks import (
    AttentionStatistics,
    CircuitOverlap,
    ConceptDecodability,
    ConceptPatching,
    HeadAblation,
    HeadAttribution,
    ICLCallback,
    ICLCurves,
    OODPeakCheckpoint,
)
from lightning_icl.capture import Capture, CaptureSpec
from lightning_icl.checkpoints import DivergenceError, SafeCheckpointIO, load_trained
from lightning_icl.config import OptimizerConfig, TransformerConfig
from lightning_icl.hf_module import HFCausalLMModule
from lightning_icl.interventions import ablation_effects, head_attribution
from lightning_icl.interventions.patching import concept_patching, function_vector_effects
from lightning_icl.models import ICLTransformer
from lightning_icl.module import ICLModule
from lightning_icl.pruning import SubnetworkPruning
from lightning_icl.tasks import (
    BitwiseDataModule,
    ICLBatch,
    ICLDataModule,
    LinearRegressionDataModule,
    ModularArithmeticDataModule,
    MultiFamilyDataModule,
    SparseLinearRegressionDataModule,
    TaskInfo,
)

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AttentionStatistics",
    "BitwiseDataModule",
    "Capture",
    "CaptureSpec",
    "CircuitOverlap",
    "ConceptDecodability",
    "ConceptPatching",
    "DivergenceError",
    "HFCausalLMAdapter",
    "HFCausalLMModule",
    "HeadAblation",
    "HeadAttribution",
    "HookAdapter",
    "ICLBatch",
    "ICLCallback",
    "ICLCurves",
    "ICLDataModule",
    "ICLModule",
    "ICLModuleAdapter",
    "ICLTransformer",
    "LinearRegressionDataModule",
    "ModularArithmeticDataModule",
    "MultiFamilyDataModule",
    "OODPeakCheckpoint",
    "OptimizerConfig",
    "SafeCheckpointIO",
    "SparseLinearRegressionDataModule",
    "SubnetworkPruning",
    "TaskInfo",
    "TransformerConfig",
    "ablation_effects",
    "adapter_for",
    "concept_patching",
    "function_vector_effects",
    "head_attribution",
    "load_trained",
]
