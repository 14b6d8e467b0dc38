"""Regression ICL tasks with vector tokens (Garg et al. 2022; Han et al. 2024).

A sequence is ``x_1, y~_1, x_2, y~_2, ...`` with ``y~ = (y, 0, ..., 0)``; the
prediction of ``y_k`` is read at the position of ``x_k`` (which cannot see ``y~_k``).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from lightning_icl.checks import check_flag, check_noise, check_positive

from .base import ICLDataModule, Sampler, TaskInfo, generator_for
from .batch import ICLBatch


def interleave(x: Tensor, y: Tensor, concept: Tensor, split: str) -> ICLBatch:
    """Build the batch from x ``[B, K, D]`` and y ``[B, K]``."""
    b, k, d = x.shape
    y_tok = torch.zeros_like(x)
    y_tok[..., 0] = y
    inputs = torch.stack([x, y_tok], dim=2).reshape(b, 2 * k, d)  # [B, 2K, D]
    pos = torch.arange(2 * k, device=x.device)
    scored = (pos % 2 == 0).expand(b, 2 * k).clone()
    targets = torch.zeros(b, 2 * k, dtype=x.dtype, device=x.device)
    targets[:, 0::2] = y
    shot = torch.where(scored, (pos // 2).expand(b, 2 * k), torch.full((b, 2 * k), -1, device=x.device))
    return ICLBatch(inputs, targets, scored, concept, shot, (pos % 2).expand(b, 2 * k).clone(), split)


def check_distinct_bases(dim: int, num_bases: int, rank: int) -> None:
    """Raise unless ``num_bases`` distinct subsets of ``rank`` coordinates exist among ``dim``."""
    if num_bases > math.comb(dim, rank):
        raise ValueError(
            f"num_bases={num_bases} distinct bases of rank={rank} do not exist in dim={dim}: there are only "
            f"C({dim}, {rank}) = {math.comb(dim, rank)}; lower num_bases, or change rank or dim"
        )


def sparse_bases(dim: int, num_bases: int, rank: int, overlapping: bool, generator: torch.Generator) -> Tensor:
    """``[num_bases, dim]`` bool masks, each switching on ``rank`` coordinates.

    Non-overlapping bases take consecutive disjoint blocks; overlapping ones are
    distinct random subsets (drawn until ``num_bases`` distinct ones are found, so there must be
    that many: ``num_bases <= C(dim, rank)``).
    """
    masks = torch.zeros(num_bases, dim, dtype=torch.bool)
    if not overlapping:
        for i in range(num_bases):
            masks[i, i * rank : (i + 1) * rank] = True
        return masks
    check_distinct_bases(dim, num_bases, rank)
    seen: set[tuple[int, ...]] = set()
    while len(seen) < num_bases:
        seen.add(tuple(sorted(torch.randperm(dim, generator=generator)[:rank].tolist())))
    for i, coords in enumerate(sorted(seen)):
        masks[i, list(coords)] = True
    return masks[torch.randperm(num_bases, generator=generator)]


def sample_sparse_regression(
    gen: torch.Generator, index: int, *, bases: Tensor, num_shots: int, noise_std: float, batch_size: int, split: str
) -> ICLBatch:
    num_bases, dim = bases.shape
    device = gen.device
    concept = torch.randint(num_bases, (batch_size,), generator=gen, device=device)
    w = torch.randn(batch_size, dim, generator=gen, device=device) * bases[concept]  # [B, D], zero off the basis
    x = torch.randn(batch_size, num_shots, dim, generator=gen, device=device)
    y = torch.einsum("bkd,bd->bk", x, w) + noise_std * torch.randn(batch_size, num_shots, generator=gen, device=device)
    return interleave(x, y, concept, split)


class SparseLinearRegressionDataModule(ICLDataModule):
    """Han et al. 2024 sparse linear regression; the concept is the basis of W.

    Args:
        dim: D, the input dimension.
        num_bases: how many bases (concepts); one is drawn per sequence.
        rank: coordinates each basis switches on.
        overlapping: random overlapping bases instead of disjoint blocks.
        num_shots: K, examples per sequence (sequence length 2K).
        noise_std: standard deviation of the label noise (0.1 is variance 0.01).
        batch_size, eval_batch_size, num_eval_batches, seed, num_workers, sample_on_device: as in
            :class:`~lightning_icl.ModularArithmeticDataModule`.

    One evaluation split, ``all``, with bases drawn uniformly.
    """

    def __init__(
        self,
        dim: int = 16,
        num_bases: int = 4,
        rank: int = 4,
        overlapping: bool = False,
        num_shots: int = 20,
        noise_std: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_eval_batches: int = 4,
        seed: int = 0,
        num_workers: int = 0,
        sample_on_device: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_eval_batches, seed, num_workers, "icl", sample_on_device)
        for name, value in (("dim", dim), ("num_bases", num_bases), ("rank", rank), ("num_shots", num_shots)):
            check_positive(name, value)
        if rank > dim:
            raise ValueError(f"rank={rank} is larger than dim={dim}")
        check_flag("overlapping", overlapping)
        if overlapping:
            check_distinct_bases(dim, num_bases, rank)
        if not overlapping and num_bases * rank > dim:
            raise ValueError(
                f"num_bases * rank = {num_bases * rank} disjoint coordinates do not fit in dim={dim}; "
                "set overlapping=True"
            )
        check_noise(noise_std)
        self.dim, self.num_shots, self.noise_std = dim, num_shots, noise_std
        self.save_hyperparameters()
        self.bases = sparse_bases(dim, num_bases, rank, overlapping, generator_for(seed, "bases"))

    @property
    def task_info(self) -> TaskInfo:
        return TaskInfo(
            kind="vectors",
            seq_len=2 * self.num_shots,
            num_shots=self.num_shots,
            input_dim=self.dim,
            num_token_classes=2,
            token_class_names=["x", "y"],
            num_concepts=self.bases.shape[0],
            eval_splits=["all"],
        )

    def _sampler(self, batch_size: int, split: str) -> Sampler:
        return partial(
            sample_sparse_regression,
            bases=self.bases,
            num_shots=self.num_shots,
            noise_std=self.noise_std,
            batch_size=batch_size,
            split=split,
        )

    def train_sampler(self) -> Sampler:
        return self._sampler(self.batch_size, "train")

    def eval_samplers(self) -> dict[str, Sampler]:
        return {"all": self._sampler(self.eval_batch_size, "all")}


def curriculum_value(start: int, end: int, increment: int, interval: int, step: int) -> int:
    """Garg et al.'s schedule: ``start`` raised by ``increment`` every ``interval`` steps, up to ``end``."""
    return min(end, start + increment * (step // interval))


def sample_linear_regression(
    gen: torch.Generator,
    index: int,
    *,
    dim: int,
    num_points: int,
    curriculum: tuple[int, int, int, int, int, int, int] | None,
    noise_std: float,
    batch_size: int,
    split: str,
) -> ICLBatch:
    active, points = dim, num_points
    if curriculum is not None:  # (dim_start, dim_inc, points_start, points_inc, interval, dim_end, points_end)
        d0, di, p0, pi, every, d1, p1 = curriculum
        active = curriculum_value(d0, d1, di, every, index)
        points = curriculum_value(p0, p1, pi, every, index)
    device = gen.device
    x = torch.randn(batch_size, points, dim, generator=gen, device=device)
    x[..., active:] = 0.0  # inactive coordinates stay zero, so the input width is fixed
    w = torch.zeros(batch_size, dim, device=device)
    w[:, :active] = torch.randn(batch_size, active, generator=gen, device=device)
    y = torch.einsum("bkd,bd->bk", x, w) + noise_std * torch.randn(batch_size, points, generator=gen, device=device)
    return interleave(x, y, w.abs().argmax(dim=1), split)


class LinearRegressionDataModule(ICLDataModule):
    """Garg et al. 2022 dense linear regression, with its curriculum.

    Training batch ``i`` (= optimizer step ``i``) uses
    ``min(dim, dim_start + dim_increment * (i // curriculum_interval))`` active
    dimensions and likewise for the number of points; evaluation always uses
    the full ``dim`` and ``num_points`` (split ``full``). The concept label is the
    coordinate of w with the largest magnitude, a discrete summary of the latent task.
    """

    def __init__(
        self,
        dim: int = 20,
        num_points: int = 41,
        curriculum: bool = True,
        dim_start: int = 5,
        dim_increment: int = 1,
        points_start: int = 11,
        points_increment: int = 2,
        curriculum_interval: int = 2000,
        noise_std: float = 0.0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_eval_batches: int = 4,
        seed: int = 0,
        num_workers: int = 0,
        sample_on_device: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_eval_batches, seed, num_workers, "icl", sample_on_device)
        for name, value in (
            ("dim", dim),
            ("num_points", num_points),
            ("dim_start", dim_start),
            ("points_start", points_start),
            ("curriculum_interval", curriculum_interval),
        ):
            check_positive(name, value)
        check_positive("dim_increment", dim_increment, minimum=0)
        check_positive("points_increment", points_increment, minimum=0)
        check_flag("curriculum", curriculum)
        if curriculum and dim_start > dim:
            raise ValueError(f"dim_start={dim_start} is larger than dim={dim}")
        if curriculum and points_start > num_points:
            raise ValueError(f"points_start={points_start} is larger than num_points={num_points}")
        check_noise(noise_std)
        self.dim, self.num_points, self.noise_std = dim, num_points, noise_std
        self.schedule = (
            (dim_start, dim_increment, points_start, points_increment, curriculum_interval, dim, num_points)
            if curriculum
            else None
        )
        self.save_hyperparameters()

    @property
    def task_info(self) -> TaskInfo:
        return TaskInfo(
            kind="vectors",
            seq_len=2 * self.num_points,
            num_shots=self.num_points,
            input_dim=self.dim,
            num_token_classes=2,
            token_class_names=["x", "y"],
            num_concepts=self.dim,
            eval_splits=["full"],
        )

    def train_sampler(self) -> Sampler:
        return partial(
            sample_linear_regression,
            dim=self.dim,
            num_points=self.num_points,
            curriculum=self.schedule,
            noise_std=self.noise_std,
            batch_size=self.batch_size,
            split="train",
        )

    def eval_samplers(self) -> dict[str, Sampler]:
        return {
            "full": partial(
                sample_linear_regression,
                dim=self.dim,
                num_points=self.num_points,
                curriculum=None,
                noise_std=self.noise_std,
                batch_size=self.eval_batch_size,
                split="full",
            )
        }
