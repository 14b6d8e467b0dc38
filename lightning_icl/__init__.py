"""lightning_icl: study in-context learning inside transformers while they train."""

from lightning_icl.callbacks import (
    AttentionStatistics,
    CircuitOverlap,
    ConceptDecodability,
    ConceptPatching,
    HeadAblation,
    HeadAttribution,
    ICLCurves,
)
from lightning_icl.capture import Capture, CaptureSpec
from lightning_icl.hf_module import HFCausalLMModule
from lightning_icl.models import ICLTransformer
from lightning_icl.module import ICLModule
from lightning_icl.pruning import HardConcrete, SubnetworkPruning, effective_size, heuristic_core, keep_frequency
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
    "AttentionStatistics",
    "BitwiseDataModule",
    "Capture",
    "CaptureSpec",
    "CircuitOverlap",
    "ConceptDecodability",
    "ConceptPatching",
    "HFCausalLMModule",
    "HardConcrete",
    "HeadAblation",
    "HeadAttribution",
    "ICLBatch",
    "ICLCurves",
    "ICLDataModule",
    "ICLModule",
    "ICLTransformer",
    "LinearRegressionDataModule",
    "ModularArithmeticDataModule",
    "MultiFamilyDataModule",
    "SparseLinearRegressionDataModule",
    "SubnetworkPruning",
    "TaskInfo",
    "effective_size",
    "heuristic_core",
    "keep_frequency",
]
