"""ICL task families: pure seeded samplers wrapped by LightningDataModules."""

from .base import ICLDataModule, TaskInfo
from .batch import ICLBatch
from .bitwise import BitwiseDataModule
from .modular import ModularArithmeticDataModule
from .multi import MultiFamilyDataModule
from .regression import LinearRegressionDataModule, SparseLinearRegressionDataModule

__all__ = [
    "BitwiseDataModule",
    "ICLBatch",
    "ICLDataModule",
    "LinearRegressionDataModule",
    "ModularArithmeticDataModule",
    "MultiFamilyDataModule",
    "SparseLinearRegressionDataModule",
    "TaskInfo",
]
