"""Modular arithmetic ICL (He et al. 2024): z = a*x + b*y mod p, task (a, b) never shown.

A sequence holds ``num_shots`` examples ``x y z`` of one task, one token per number.
The model reads ``tokens[:-1]``, predicts ``tokens[1:]``, and is scored on z only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from lightning_icl.checks import check_choice, check_flag, check_number, check_positive, is_integer

from .base import ICLDataModule, Sampler, TaskInfo, generator_for
from .batch import ICLBatch

TASK_RULES = ("rectangular", "random")
EVAL_SPLITS = ("id_seen", "id_unseen", "ood_seen", "ood_unseen")
"""i.d./OOD tasks x (x, y) pairs from the training/held-out part of the alpha split."""


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def rectangular_task_set(p: int, num_tasks: int, generator: torch.Generator, max_tries: int = 100_000) -> Tensor:
    """``[num_tasks, 2]`` distinct tasks by the rectangular rule.

    Draw a random (a, b), pick x not in {a, b} and y not in {a, b, x}, and add the
    rectangle (a, b), (a, y), (x, b), (x, y); rectangles sharing a task with the
    set so far are skipped. ``num_tasks`` must be a multiple of 4.
    """
    chosen: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(max_tries):
        if len(chosen) == num_tasks:
            break
        a, b = torch.randint(p, (2,), generator=generator).tolist()
        x_choices = [c for c in range(p) if c not in (a, b)]
        x = x_choices[int(torch.randint(len(x_choices), (1,), generator=generator))]
        y_choices = [c for c in range(p) if c not in (a, b, x)]
        if not y_choices:
            continue
        y = y_choices[int(torch.randint(len(y_choices), (1,), generator=generator))]
        rect = [(a, b), (a, y), (x, b), (x, y)]
        if any(t in seen for t in rect):
            continue
        chosen.extend(rect)
        seen.update(rect)
    if len(chosen) != num_tasks:
        raise ValueError(f"num_tasks={num_tasks}: could not place that many tasks by the rectangular rule for p={p}")
    return torch.tensor(chosen, dtype=torch.long)


def random_task_set(p: int, num_tasks: int, generator: torch.Generator) -> Tensor:
    """``[num_tasks, 2]`` distinct tasks drawn uniformly from Z_p^2."""
    flat = torch.randperm(p * p, generator=generator)[:num_tasks]
    return torch.stack([flat // p, flat % p], dim=1)


def ood_task_set(p: int, id_tasks: Tensor, max_tasks: int, generator: torch.Generator) -> Tensor:
    """``[<=max_tasks, 2]``: tasks not in ``id_tasks``, shuffled."""
    taken = torch.zeros(p * p, dtype=torch.bool)
    taken[id_tasks[:, 0] * p + id_tasks[:, 1]] = True
    rest = (~taken).nonzero().squeeze(1)
    rest = rest[torch.randperm(rest.numel(), generator=generator)][:max_tasks]
    return torch.stack([rest // p, rest % p], dim=1)


def split_inputs(p: int, alpha: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The p^2 (x, y) pairs of numbers below ``p`` shuffled once; the first round(alpha p^2) are seen in training."""
    flat = torch.randperm(p * p, generator=generator)
    pairs = torch.stack([flat // p, flat % p], dim=1)
    n_train = round(alpha * p * p)
    return pairs[:n_train], pairs[n_train:]


def triples_batch(x: Tensor, y: Tensor, z: Tensor, concept: Tensor, split: str) -> ICLBatch:
    """Sequences ``x y z x y z ...`` of ``[B, K]`` examples, scored at every z (the token before it
    predicts it), with token classes x = 0, y = 1, z = 2: the layout of every two-operand token task."""
    n, num_shots = x.shape
    tokens = torch.stack([x, y, z], dim=2).reshape(n, 3 * num_shots)  # [B, 3K]: x y z x y z ...
    t = 3 * num_shots - 1
    pos = torch.arange(t, device=x.device)
    scored = (pos % 3 == 1).expand(n, t)  # target tokens[t+1] is a z
    shot = torch.where(scored, (pos // 3).expand(n, t), torch.full((n, t), -1, device=x.device))
    return ICLBatch(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        mask=scored.clone(),
        concept=concept,
        shot=shot,
        token_class=(pos % 3).expand(n, t).clone(),
        split=split,
    )


def sample_sequences(
    tasks: Tensor, pairs: Tensor, num_shots: int, p: int, generator: torch.Generator, split: str
) -> ICLBatch:
    """One batch: sequence i uses task ``tasks[i]`` and ``num_shots`` (x, y) drawn from ``pairs``."""
    n = tasks.shape[0]
    pick = torch.randint(pairs.shape[0], (n, num_shots), generator=generator, device=generator.device)
    x, y = pairs[pick, 0], pairs[pick, 1]  # [B, K]
    z = (tasks[:, :1] * x + tasks[:, 1:] * y) % p
    return triples_batch(x, y, z, tasks[:, 0] * p + tasks[:, 1], split)


class TaskSetSampling:
    """``train_sampler`` / ``eval_samplers`` of a family of tasks applied to pairs of inputs.

    A DataModule mixing this in sets ``training_tasks``, ``train_pairs``, ``input_size`` (what its
    ``sample`` takes as the input range), ``num_shots``, ``balanced`` and the batch sizes, names its
    sequence layout as the static method ``sample``, and returns its evaluation splits as
    ``{name: (tasks, pairs)}`` from ``eval_sources``; splits with no task or no pair are left out.
    """

    def train_sampler(self) -> Sampler:
        return partial(
            task_set_train_batch,
            sample=self.sample,
            tasks=self.training_tasks,
            pairs=self.train_pairs,
            num_shots=self.num_shots,
            size=self.input_size,
            batch_size=self.batch_size,
            balanced=self.balanced,
        )

    def eval_samplers(self) -> dict[str, Sampler]:
        return {
            name: partial(
                task_set_eval_batch,
                sample=self.sample,
                name=name,
                tasks=tasks,
                pairs=pairs,
                num_shots=self.num_shots,
                size=self.input_size,
                batch_size=self.eval_batch_size,
            )
            for name, (tasks, pairs) in self.eval_sources().items()
            if tasks.shape[0] and pairs.shape[0]
        }


class ModularArithmeticDataModule(TaskSetSampling, ICLDataModule):
    """He et al. 2024 modular arithmetic ICL: sequences ``x y z x y z ...`` with z = a·x + b·y mod p.

    Example:
        >>> data = ModularArithmeticDataModule(p=7, num_tasks=4, num_shots=3, batch_size=8)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch.inputs.shape, batch.mask.sum(dim=1).tolist()  # 3 shots: 8 tokens, an answer per shot
        (torch.Size([8, 8]), [3, 3, 3, 3, 3, 3, 3, 3])
        >>> sorted(data.task_info.eval_splits)
        ['id_seen', 'id_unseen', 'ood_seen', 'ood_unseen']

    Args:
        p: the prime modulus; numbers are tokens 0..p-1.
        num_tasks: n_i.d., the number of pre-training tasks (a, b).
        task_rule: ``"rectangular"`` (multiple of 4 tasks in rectangles) or ``"random"``.
        num_ood_tasks: at most this many held-out tasks for the OOD splits.
        alpha: fraction of the p^2 (x, y) pairs seen in training.
        num_shots: examples per sequence (sequence length 3*num_shots - 1).
        batch_size: training sequences per batch.
        balanced: every training batch holds batch_size/num_tasks sequences of each task.
        eval_batch_size: sequences per evaluation batch (default: batch_size).
        num_eval_batches: batches per evaluation split.
        seed: fixes the task sets, the alpha split and every batch.
        batch_format: ``"icl"`` (:class:`ICLBatch`) or ``"causal_lm"`` (Hugging Face dicts with
            ``input_ids``, ``labels`` and ``concept``, for a user's own language model).
        num_workers: dataloader worker processes drawing training batches on the host.
        sample_on_device: draw training batches on the training device (``None``: on CUDA;
            see :class:`~lightning_icl.tasks.base.ICLDataModule`).

    The concept label of a sequence is ``a*p + b``. Evaluation splits:
    ``id_seen``, ``id_unseen``, ``ood_seen``, ``ood_unseen`` (empty ones are dropped).
    """

    def __init__(
        self,
        p: int = 29,
        num_tasks: int = 512,
        task_rule: str = "rectangular",
        num_ood_tasks: int = 256,
        alpha: float = 0.6,
        num_shots: int = 32,
        batch_size: int = 1024,
        balanced: bool = True,
        eval_batch_size: int | None = None,
        num_eval_batches: int = 4,
        seed: int = 0,
        num_workers: int = 0,
        batch_format: str = "icl",
        sample_on_device: bool | None = None,
    ) -> None:
        super().__init__(
            batch_size, eval_batch_size, num_eval_batches, seed, num_workers, batch_format, sample_on_device
        )
        if not is_integer(p) or not is_prime(p):
            raise ValueError(f"p must be a prime, got {p!r}")
        check_choice("task_rule", task_rule, TASK_RULES)
        if task_rule == "rectangular" and p < 3:
            raise ValueError(f"p must be >= 3 with task_rule='rectangular' (a rectangle needs 3 numbers), got {p}")
        check_positive("num_tasks", num_tasks)
        if num_tasks > p * p:
            raise ValueError(f"num_tasks={num_tasks} is larger than the task space p^2={p * p}")
        if task_rule == "rectangular" and num_tasks % 4:
            raise ValueError(f"num_tasks must be a multiple of 4 with task_rule='rectangular', got {num_tasks}")
        check_positive("num_ood_tasks", num_ood_tasks, minimum=0)
        check_number("alpha", alpha, 0.0, 1.0, low_open=True)
        if round(alpha * p * p) < 1:
            raise ValueError(f"alpha={alpha} leaves no (x, y) pair for training with p={p}")
        check_positive("num_shots", num_shots)
        check_flag("balanced", balanced)
        check_balanced(batch_size, num_tasks, "num_tasks", balanced)
        self.p, self.num_shots, self.balanced = p, num_shots, balanced
        self.save_hyperparameters()

        build = rectangular_task_set if task_rule == "rectangular" else random_task_set
        self.id_tasks = build(p, num_tasks, generator_for(seed, "id_tasks"))
        self.training_tasks, self.input_size = self.id_tasks, p  # what TaskSetSampling draws from
        self.ood_tasks = ood_task_set(p, self.id_tasks, num_ood_tasks, generator_for(seed, "ood_tasks"))
        self.train_pairs, self.test_pairs = split_inputs(p, alpha, generator_for(seed, "alpha_split"))

    @property
    def task_info(self) -> TaskInfo:
        return TaskInfo(
            kind="tokens",
            seq_len=3 * self.num_shots - 1,
            num_shots=self.num_shots,
            vocab_size=self.p,
            num_token_classes=3,
            token_class_names=["x", "y", "z"],
            num_concepts=self.p * self.p,
            eval_splits=list(self.eval_samplers()),
        )

    sample = staticmethod(sample_sequences)

    def eval_sources(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {
            "id_seen": (self.id_tasks, self.train_pairs),
            "id_unseen": (self.id_tasks, self.test_pairs),
            "ood_seen": (self.ood_tasks, self.train_pairs),
            "ood_unseen": (self.ood_tasks, self.test_pairs),
        }


def check_balanced(batch_size: int, num_tasks: int, name: str, balanced: bool) -> None:
    """``balanced`` batches hold every task equally often: ``batch_size`` a multiple of the task count."""
    if balanced and batch_size % num_tasks:
        raise ValueError(f"batch_size={batch_size} must be a multiple of {name}={num_tasks} when balanced=True")


def task_set_train_batch(
    gen: torch.Generator,
    index: int,
    *,
    sample: Callable[..., ICLBatch],
    tasks: Tensor,
    pairs: Tensor,
    num_shots: int,
    size: int,
    batch_size: int,
    balanced: bool,
) -> ICLBatch:
    """A training batch of a task-set family: each sequence's task drawn from ``tasks`` (every task
    equally often when ``balanced``), its inputs from ``pairs``, laid out by ``sample``."""
    if balanced:
        chosen = tasks.repeat_interleave(batch_size // tasks.shape[0], dim=0)
    else:
        chosen = tasks[torch.randint(tasks.shape[0], (batch_size,), generator=gen, device=gen.device)]
    return sample(chosen, pairs, num_shots, size, gen, "train")


def task_set_eval_batch(
    gen: torch.Generator,
    index: int,
    *,
    sample: Callable[..., ICLBatch],
    name: str,
    tasks: Tensor,
    pairs: Tensor,
    num_shots: int,
    size: int,
    batch_size: int,
) -> ICLBatch:
    """Evaluation batch ``index`` of split ``name``: the tasks cycled so every task is evaluated equally often."""
    chosen = tasks[(index * batch_size + torch.arange(batch_size, device=tasks.device)) % tasks.shape[0]]
    return sample(chosen, pairs, num_shots, size, gen, name)
