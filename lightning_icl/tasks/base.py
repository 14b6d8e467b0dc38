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

from lightning_icl.checks import check_choice, check_flag, check_noise, check_positive  # noqa: F401 (check_noise: re-exported)

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


@dataclass(frozen=True)
class TrainIndex:
    """The index of a training batch still to be drawn: what the loader yields when batches are
    sampled on the device (:meth:`ICLDataModule.transfer_batch_to_device` draws it there)."""

    index: int


class IndexStream(IterableDataset):
    """Endless :class:`TrainIndex` ``start, start + 1, ...`` (one process: nothing to share out)."""

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def __iter__(self) -> Iterator[TrainIndex]:
        index = self.start
        while True:
            yield TrainIndex(index)
            index += 1


def sampler_on(sampler: Sampler, device: torch.device) -> Sampler:
    """``sampler`` (a :func:`functools.partial`) with the tensors it was given moved to ``device``."""
    if not isinstance(sampler, partial):
        raise TypeError(f"a sampler drawn on the device must be a functools.partial, got {type(sampler).__name__}")
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
    inner = sampler_on(sampler.func, device) if isinstance(sampler.func, partial) else sampler.func
    return partial(inner, *map(move, sampler.args), **{k: move(v) for k, v in sampler.keywords.items()})


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

    ``sample_on_device``: draw the training batches on the device the model trains on, from a
    generator there seeded as the host stream is (batch ``i`` of rank ``r`` from ``(seed, r, i)``),
    so no batch is copied from the host per step. ``None`` (the default): on when the Trainer runs
    on CUDA with one process per device and no dataloader workers. On the CPU the batches are the
    host stream's, bit for bit; on a GPU they are a different draw of the same distribution (its
    generator is not the CPU's), still a pure function of the seed, rank and index, so a resumed run
    continues it. Evaluation batches are always drawn on the host (fixed sets).
    """

    device_sampling = True
    """Whether this family's samplers can draw on a device (every tensor made on the generator's)."""

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_eval_batches: int,
        seed: int,
        num_workers: int,
        batch_format: str = "icl",
        sample_on_device: bool | None = None,
    ) -> None:
        super().__init__()
        check_choice("batch_format", batch_format, BATCH_FORMATS)
        if sample_on_device is not None:
            check_flag("sample_on_device", sample_on_device)
            if sample_on_device and not self.device_sampling:
                raise ValueError(
                    f"sample_on_device=True: {type(self).__name__} draws its batches on the host; "
                    "leave it None or False"
                )
            if sample_on_device and num_workers:
                raise ValueError(
                    f"sample_on_device=True draws batches in the training process; num_workers={num_workers} "
                    "would be idle: set num_workers=0"
                )
        self.batch_format, self.sample_on_device = batch_format, sample_on_device
        self._device_samplers: dict[torch.device, tuple[Sampler, torch.Generator]] = {}
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

    def samples_on_device(self) -> bool:
        """Whether this fit's training batches are drawn on the device (``sample_on_device`` resolved
        against the Trainer: ``None`` means on for CUDA, with no dataloader workers)."""
        if self.sample_on_device is not None:
            return self.sample_on_device
        trainer = self.trainer
        if trainer is None or not self.device_sampling or self.num_workers:
            return False
        return trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        # Resume the stream where a restored checkpoint stopped (one batch per optimizer step).
        start, rank = 0, 0
        if self.trainer is not None:
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
            rank = self.trainer.global_rank
        if self.samples_on_device():
            return self._loader(IndexStream(start))
        return self._loader(TrainStream(self._formatted(self.train_sampler()), self.seed, start, rank))

    def draw_on(self, device: torch.device | str, index: int, rank: int = 0):
        """Training batch ``index`` of ``rank`` drawn on ``device`` (on the CPU: the host stream's batch)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._device_samplers:
            self._device_samplers[device] = (
                self._formatted(sampler_on(self.train_sampler(), device)),
                torch.Generator(device=device),
            )
        sampler, generator = self._device_samplers[device]
        return sampler(generator.manual_seed(derive_seed(self.seed, "train", rank, index)), index)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, TrainIndex):
            return self.draw_on(device, batch.index, self.trainer.global_rank if self.trainer is not None else 0)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        return [
            self._loader(FixedBatches(self._formatted(sampler), self.seed, f"{stage}/{name}", self.num_eval_batches))
            for name, sampler in self.eval_samplers().items()
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
