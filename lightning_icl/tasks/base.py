"""Seeded batch streams and the DataModule base shared by the ICL tasks.

Every batch is a pure function of ``(seed, stream, rank, index)``: the same
index gives the same batch whatever the number of dataloader workers, ranks
draw distinct batches, and a resumed run continues the stream where it stopped.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lightning_icl.checks import check_choice, check_noise, check_positive  # noqa: F401 (check_noise: re-exported)

from .batch import ICLBatch

BATCH_FORMATS = ("icl", "causal_lm")
"""``icl``: :class:`ICLBatch`; ``causal_lm``: Hugging Face dicts (``ICLBatch.as_causal_lm``)."""

Sampler = Callable[[torch.Generator, int], ICLBatch]
"""``sampler(generator, index) -> ICLBatch``: draws one batch from the generator."""


def _as_causal_lm(sampler: Sampler, generator: torch.Generator, index: int) -> dict:
    return sampler(generator, index).as_causal_lm()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


class TrainStream(IterableDataset):
    """Endless training batches; batch ``i`` of rank ``r`` is drawn from seed ``(seed, r, i)``.

    Workers take interleaved indices (worker ``w`` of ``n`` yields ``start + w``,
    ``start + w + n`` ...), which the DataLoader returns in index order.
    """

    def __init__(self, sampler: Sampler, seed: int, start: int = 0, rank: int = 0) -> None:
        self.sampler, self.seed, self.start, self.rank = sampler, seed, start, rank

    def __iter__(self) -> Iterator[ICLBatch]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start + worker
        while True:
            yield self.sampler(generator_for(self.seed, "train", self.rank, index), index)
            index += n_workers


class FixedBatches(Dataset):
    """``num_batches`` evaluation batches, batch ``i`` drawn from seed ``(seed, name, i)``.

    Map-style, so under DDP Lightning's distributed sampler gives each rank its own indices.
    """

    def __init__(self, sampler: Sampler, seed: int, name: str, num_batches: int) -> None:
        self.sampler, self.seed, self.name, self.num_batches = sampler, seed, name, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> ICLBatch:
        if not 0 <= index < self.num_batches:
            raise IndexError(index)
        return self.sampler(generator_for(self.seed, self.name, index), index)


TASK_KINDS = ("tokens", "vectors")


@dataclass
class TaskInfo:
    """What a model needs to know about a task family.

    ``kind`` is ``"tokens"`` (``vocab_size`` used) or ``"vectors"`` (``input_dim`` used,
    a scalar target read out at each scored position). ``token_class_names`` names the roles of
    ``ICLBatch.token_class`` (e.g. ``x``, ``y``, ``z``), for figures.
    """

    kind: str
    seq_len: int
    num_shots: int
    vocab_size: int = 0
    input_dim: int = 0
    num_token_classes: int = 1
    num_concepts: int = 1
    eval_splits: list[str] = field(default_factory=list)
    token_class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("TaskInfo kind", self.kind, TASK_KINDS)
        for name, minimum in (
            ("seq_len", 1),
            ("num_shots", 1),
            ("vocab_size", 1 if self.kind == "tokens" else 0),
            ("input_dim", 1 if self.kind == "vectors" else 0),
            ("num_token_classes", 1),
            ("num_concepts", 1),
        ):
            check_positive(f"TaskInfo {name}", getattr(self, name), minimum)
        for name in ("eval_splits", "token_class_names"):
            values = getattr(self, name)
            if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"TaskInfo {name} must be a list of names, got {values!r}")

    def class_names(self) -> list[str]:
        """A name per token class: ``token_class_names``, or ``class <i>`` where none were given."""
        names = list(self.token_class_names)
        return names + [f"class {i}" for i in range(len(names), self.num_token_classes)]

    def as_dict(self) -> dict:
        return asdict(self)


class ICLDataModule(L.LightningDataModule, ABC):
    """Base of the task DataModules: seeded training stream plus named evaluation splits.

    Subclasses build their task in ``__init__`` and implement :meth:`train_sampler`,
    :meth:`eval_samplers` and :attr:`task_info`.
    """

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_eval_batches: int,
        seed: int,
        num_workers: int,
        batch_format: str = "icl",
    ) -> None:
        super().__init__()
        check_choice("batch_format", batch_format, BATCH_FORMATS)
        self.batch_format = batch_format
        eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        check_positive("batch_size", batch_size)
        check_positive("eval_batch_size", eval_batch_size)
        check_positive("num_eval_batches", num_eval_batches)
        check_positive("num_workers", num_workers, minimum=0)
        check_positive("seed", seed, minimum=None)
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.num_eval_batches, self.num_workers = num_eval_batches, num_workers

    @property
    @abstractmethod
    def task_info(self) -> TaskInfo: ...

    @abstractmethod
    def train_sampler(self) -> Sampler: ...

    @abstractmethod
    def eval_samplers(self) -> dict[str, Sampler]:
        """Evaluation splits in a fixed order, name -> sampler."""

    def _formatted(self, sampler: Sampler) -> Sampler:
        return sampler if self.batch_format == "icl" else partial(_as_causal_lm, sampler)

    def _loader(self, dataset: Dataset | IterableDataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # the samplers already draw whole batches
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Resume the stream where a restored checkpoint stopped (one batch per optimizer step).
        start, rank = 0, 0
        if self.trainer is not None:
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
            rank = self.trainer.global_rank
        return self._loader(TrainStream(self._formatted(self.train_sampler()), self.seed, start, rank))

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        return [
            self._loader(FixedBatches(self._formatted(sampler), self.seed, f"{stage}/{name}", self.num_eval_batches))
            for name, sampler in self.eval_samplers().items()
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
