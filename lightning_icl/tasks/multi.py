"""Several task families in one run, each sequence labelled with its family.

Training batches mix the families row-wise by weight; evaluation keeps one loader per
(family, split), so per-family metrics come from one model. Concept labels are made
globally unique by offsetting each family's concepts; token ids are shared, or shifted
into one range per family with ``disjoint_vocab``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from itertools import accumulate

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_icl.checks import check_flag, check_number, check_positive

from .base import FixedBatches, ICLDataModule, Sampler, TaskInfo, derive_seed, generator_for
from .batch import ICLBatch


def row_counts(weights: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """``[F]`` rows per family summing to ``batch_size``, with expectation ``weights * batch_size``.

    Each family gets the floor of its share; the leftover rows go by systematic sampling on the
    fractional parts (thresholds ``u, u+1, ...`` on their cumulative sum), so a family gets one
    more row with probability equal to its fractional part.
    """
    share = weights.double() * batch_size
    counts = share.floor()
    left = batch_size - int(counts.sum())
    if left:
        cum = (share - counts).cumsum(0).clamp(max=left)
        cum[-1] = left  # exact and monotone, whatever the rounding of the sum
        prev = torch.cat([cum.new_zeros(1), cum[:-1]])
        u = torch.rand((), generator=generator, dtype=torch.float64)
        counts += torch.floor(cum - u) - torch.floor(prev - u)
    return counts.long()


def relabel(batch: ICLBatch, family: int, concept_offset: int, token_offset: int, split: str) -> ICLBatch:
    """The batch seen as rows of family ``family``: concepts and (optionally) token ids shifted."""
    return replace(
        batch,
        inputs=batch.inputs + token_offset,
        targets=batch.targets + token_offset,
        concept=batch.concept + concept_offset,
        split=split,
        family=torch.full_like(batch.concept, family),
    )


_ROW_FIELDS = ("inputs", "targets", "mask", "concept", "shot", "token_class")


def concat(batches: list[ICLBatch], split: str) -> ICLBatch:
    """Row-wise concatenation of batches with the same layout (``family`` kept if all have one)."""
    rows = {name: torch.cat([getattr(b, name) for b in batches]) for name in _ROW_FIELDS}
    family = None if any(b.family is None for b in batches) else torch.cat([b.family for b in batches])
    return ICLBatch(**rows, split=split, family=family)


def _family_rows(sampler: Sampler, count: int, family_batch_size: int, seed: int, index: int) -> ICLBatch:
    """``count`` rows from the family's training sampler: its whole batch when the sizes agree,
    else a random subset of as many of its batches as needed."""
    draws = math.ceil(count / family_batch_size)
    batches = [sampler(generator_for(seed, j), index) for j in range(draws)]
    batch = batches[0] if draws == 1 else concat(batches, "train")
    if count == len(batch):
        return batch
    keep = torch.randperm(len(batch), generator=generator_for(seed, "rows"))[:count].sort().values
    return replace(batch, **{name: getattr(batch, name)[keep] for name in _ROW_FIELDS})


def _train_batch(
    gen: torch.Generator,
    index: int,
    *,
    samplers: tuple[Sampler, ...],
    family_batch_sizes: tuple[int, ...],
    weights: Tensor,
    batch_size: int,
    concept_offsets: tuple[int, ...],
    token_offsets: tuple[int, ...],
) -> ICLBatch:
    counts = row_counts(weights, batch_size, gen).tolist()
    base = int(torch.randint(2**62, (1,), generator=gen))  # each family's rows from its own seeds
    parts = [
        relabel(
            _family_rows(sampler, count, family_batch_sizes[f], derive_seed(base, f), index),
            f,
            concept_offsets[f],
            token_offsets[f],
            "train",
        )
        for f, (sampler, count) in enumerate(zip(samplers, counts, strict=True))
        if count
    ]
    return concat(parts, "train")


def _eval_batch(
    gen: torch.Generator,
    index: int,
    *,
    sampler: Sampler,
    family: int,
    concept_offset: int,
    token_offset: int,
    split: str,
) -> ICLBatch:
    return relabel(sampler(gen, index), family, concept_offset, token_offset, split)


class MultiFamilyDataModule(ICLDataModule):
    """Several token task families (or task groups) trained together, each row labelled with its family.

    Args:
        families: name -> DataModule, e.g. ``{"modular": ModularArithmeticDataModule(...),
            "bitwise": BitwiseDataModule(...)}`` (in YAML, a mapping of ``class_path``/``init_args``).
            All must be token tasks with the same sequence length and layout (scored positions,
            token classes, shots). Names may not contain ``"/"`` or ``"."``.
        weights: name -> mixing proportion (normalised; default equal). A family with weight 0
            is evaluated but never trained on.
        disjoint_vocab: shift each family's token ids into its own range (vocabulary = the sum
            of the families'); by default they share ids (vocabulary = the largest).
        batch_size: training sequences per batch, mixed across families.
        num_eval_batches: batches per evaluation split (default: each family's own).
        seed: fixes the mixing and every training batch (each family's task set comes from its
            own seed).
        num_workers, batch_format: as in the other DataModules.
        sample_on_device: ``None`` or ``False``; the families' rows are drawn on the host.

    Training batch ``i`` holds ``floor(batch_size * w_f)`` rows of family ``f`` plus the leftover
    rows, given at random so that the expected share is exactly ``w_f``; rows of a family are its
    own training batch when the counts agree with its ``batch_size`` (set each family's
    ``batch_size`` to its share to keep its batches balanced), else a random subset of its batches.
    Rows come in family blocks, in the order of ``family_names``.

    Labels: ``batch.family`` is the index of the row's family in ``family_names``;
    ``batch.concept`` is ``concept_offsets[name]`` plus the family's own concept label
    (offsets are cumulative ``num_concepts`` in family order). Evaluation: one loader per
    (family, split) with ``batch.split == "<family>/<split>"`` (e.g. ``"modular/id_seen"``),
    drawing the same batches as the family's own loaders; :meth:`family_loaders` maps each
    family to its dataloader indices.
    """

    device_sampling = False  # the families' rows are drawn and relabelled on the host

    def __init__(
        self,
        families: dict[str, ICLDataModule],
        weights: dict[str, float] | None = None,
        disjoint_vocab: bool = False,
        batch_size: int = 64,
        num_eval_batches: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        batch_format: str = "icl",
        sample_on_device: bool | None = None,
    ) -> None:
        super().__init__(batch_size, None, num_eval_batches or 1, seed, num_workers, batch_format, sample_on_device)
        if num_eval_batches is not None:
            check_positive("num_eval_batches", num_eval_batches)
        self.num_eval_batches = num_eval_batches
        if not isinstance(families, dict) or not families:
            raise ValueError(f"families must be a non-empty mapping name -> DataModule, got {families!r}")
        for name, family in families.items():
            if not isinstance(name, str) or not name or "/" in name or "." in name:
                raise ValueError(f"families: the name {name!r} must be a non-empty string without '/' or '.'")
            if not isinstance(family, ICLDataModule):
                raise ValueError(f"families[{name!r}] must be an ICLDataModule, got {type(family).__name__}")
            if family.batch_format != "icl":
                raise ValueError(f"families[{name!r}] must use batch_format='icl'; set batch_format on this module")
            if family.task_info.kind != "tokens":
                raise ValueError(f"families[{name!r}] is a {family.task_info.kind!r} task; only token tasks mix")
        self.families = dict(families)
        self.family_names = list(families)
        self._check_layouts()
        self.weights = self._normalised(weights)
        check_flag("disjoint_vocab", disjoint_vocab)
        self.disjoint_vocab = disjoint_vocab
        infos = [family.task_info for family in families.values()]
        self.concept_offsets = dict(zip(self.family_names, _cumulative([i.num_concepts for i in infos]), strict=True))
        vocab_offsets = _cumulative([i.vocab_size for i in infos]) if disjoint_vocab else [0] * len(infos)
        self.token_offsets = dict(zip(self.family_names, vocab_offsets, strict=True))
        self.save_hyperparameters(ignore=["families"])
        self.hparams["families"] = {  # plain values, so checkpoints and hparams.yaml stay portable
            name: {"class_path": f"{type(f).__module__}.{type(f).__qualname__}", "init_args": dict(f.hparams)}
            for name, f in families.items()
        }

    def _check_layouts(self) -> None:
        (first, ref), *rest = self.families.items()
        ref_info = ref.task_info
        ref_batch = ref.train_sampler()(generator_for("layout"), 0)
        for name, family in rest:
            info = family.task_info
            for field in ("seq_len", "num_shots", "num_token_classes"):
                a, b = getattr(ref_info, field), getattr(info, field)
                if a != b:
                    raise ValueError(f"families {first!r} and {name!r} differ in {field}: {a} vs {b}")
            batch = family.train_sampler()(generator_for("layout"), 0)
            for field in ("mask", "token_class", "shot"):
                if not torch.equal(getattr(ref_batch, field)[0], getattr(batch, field)[0]):
                    raise ValueError(f"families {first!r} and {name!r} differ in layout: their {field} rows differ")

    def _normalised(self, weights: dict[str, float] | None) -> Tensor:
        if weights is None:
            return torch.full((len(self.family_names),), 1.0 / len(self.family_names), dtype=torch.float64)
        if not isinstance(weights, dict) or set(weights) != set(self.family_names):
            got = list(weights) if isinstance(weights, dict) else weights
            raise ValueError(f"weights must give one value per family {self.family_names}, got {got!r}")
        for name in self.family_names:
            check_number(f"weights[{name!r}]", weights[name], low=0.0)
        values = torch.tensor([float(weights[name]) for name in self.family_names], dtype=torch.float64)
        if values.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights!r}")
        return values / values.sum()

    # ---- what the model and the callbacks see -----------------------------------------
    @property
    def task_info(self) -> TaskInfo:
        infos = [family.task_info for family in self.families.values()]
        vocab = [info.vocab_size for info in infos]
        return TaskInfo(
            kind="tokens",
            seq_len=infos[0].seq_len,
            num_shots=infos[0].num_shots,
            vocab_size=sum(vocab) if self.disjoint_vocab else max(vocab),
            num_token_classes=infos[0].num_token_classes,
            token_class_names=list(infos[0].token_class_names),
            num_concepts=sum(info.num_concepts for info in infos),
            eval_splits=list(self.eval_samplers()),
        )

    def family_loaders(self) -> dict[str, list[int]]:
        """Family name -> indices of its loaders in ``val_dataloader()`` / ``test_dataloader()``."""
        out: dict[str, list[int]] = {name: [] for name in self.family_names}
        for i, (name, _, _) in enumerate(self._eval_sources()):
            out[name].append(i)
        return out

    # ---- samplers ---------------------------------------------------------------------
    def train_sampler(self) -> Sampler:
        return partial(
            _train_batch,
            samplers=tuple(family.train_sampler() for family in self.families.values()),
            family_batch_sizes=tuple(family.batch_size for family in self.families.values()),
            weights=self.weights,
            batch_size=self.batch_size,
            concept_offsets=tuple(self.concept_offsets.values()),
            token_offsets=tuple(self.token_offsets.values()),
        )

    def _eval_sources(self) -> list[tuple[str, str, Sampler]]:
        """(family name, family split, combined sampler) in loader order."""
        sources = []
        for f, (name, family) in enumerate(self.families.items()):
            for split, sampler in family.eval_samplers().items():
                combined = partial(
                    _eval_batch,
                    sampler=sampler,
                    family=f,
                    concept_offset=self.concept_offsets[name],
                    token_offset=self.token_offsets[name],
                    split=f"{name}/{split}",
                )
                sources.append((name, split, combined))
        return sources

    def eval_samplers(self) -> dict[str, Sampler]:
        return {f"{name}/{split}": sampler for name, split, sampler in self._eval_sources()}

    def _eval_loaders(self, stage: str) -> list[DataLoader]:
        # each family's own seed and split name: the same batches as the family's own loaders
        loaders = []
        for name, split, sampler in self._eval_sources():
            family = self.families[name]
            num_batches = self.num_eval_batches or family.num_eval_batches
            dataset = FixedBatches(self._formatted(sampler), family.seed, f"{stage}/{split}", num_batches)
            loaders.append(self._loader(dataset))
        return loaders


def _cumulative(sizes: list[int]) -> list[int]:
    """Offsets ``[0, s0, s0+s1, ...]`` of consecutive ranges of the given sizes."""
    return [0, *accumulate(sizes)][:-1]
