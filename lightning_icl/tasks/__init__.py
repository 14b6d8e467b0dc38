"""ICL task families: pure seeded samplers wrapped by LightningDataModules."""

from .base import ICLDataModule, TaskInfo
from .batch import ICLBatch
from .modular import ModularArithmeticDataModule
from .regression import LinearRegressionDataModule, SparseLinearRegressionDataModule

__all__ = [
    "ICLBatch",
    "ICLDataModule",
    "LinearRegressionDataModule",
    "ModularArithmeticDataModule",
    "SparseLinearRegressionDataModule",
    "TaskInfo",
]
