"""Bitwise-operation ICL (Han et al. 2024's second LLM task): y = op(x1, x2) on n-bit strings.

A sequence holds ``num_shots`` examples ``x1 x2 y`` of one operation; each n-bit string is one
token (vocabulary ``2**n_bits``), so the layout is that of modular arithmetic: the model reads
``tokens[:-1]``, predicts ``tokens[1:]`` and is scored on the y's only. The ``Null`` class
answers with a uniformly random string, so it has no rule to infer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_icl.checks import check_flag, check_number, check_positive

from .base import ICLDataModule, TaskInfo, generator_for
from .batch import ICLBatch
from .modular import TaskSetSampling, check_balanced, split_inputs, triples_batch

OPS = ("AND", "NAND", "OR", "NOR", "XOR", "XNOR", "Null")
"""Every operation; the concept label of a sequence is its operation's index in this tuple."""
MAX_BITS = 10
_GATES = {"AND": torch.bitwise_and, "OR": torch.bitwise_or, "XOR": torch.bitwise_xor}
_NEGATED = {"NAND": "AND", "NOR": "OR", "XNOR": "XOR"}


def apply_op(name: str, x1: Tensor, x2: Tensor, n_bits: int) -> Tensor:
    """``name(x1, x2)`` on integer-coded n-bit strings, for the six gates (``Null`` has no rule)."""
    if name in _NEGATED:
        return apply_op(_NEGATED[name], x1, x2, n_bits) ^ ((1 << n_bits) - 1)
    if name not in _GATES:
        raise ValueError(f"{name!r} is not a gate; gates are {tuple(_GATES) + tuple(_NEGATED)}")
    return _GATES[name](x1, x2)


def sample_sequences(
    ops: Tensor, pairs: Tensor, num_shots: int, n_bits: int, generator: torch.Generator, split: str
) -> ICLBatch:
    """One batch: sequence i uses operation ``ops[i]`` (an index into ``OPS``) on ``num_shots``
    (x1, x2) drawn from ``pairs`` ``[N, 2]``."""
    n = ops.shape[0]
    pick = torch.randint(pairs.shape[0], (n, num_shots), generator=generator, device=generator.device)
    x1, x2 = pairs[pick, 0], pairs[pick, 1]  # [B, K]
    noise = torch.randint(1 << n_bits, (n, num_shots), generator=generator, device=generator.device)  # Null's answers
    table = torch.stack([apply_op(name, x1, x2, n_bits) for name in OPS[:-1]] + [noise])  # [len(OPS), B, K]
    y = table.gather(0, ops.view(1, n, 1).expand(1, n, num_shots)).squeeze(0)
    return triples_batch(x1, x2, y, ops.clone(), split)  # x1 x2 y x1 x2 y ...


class BitwiseDataModule(TaskSetSampling, ICLDataModule):
    """Bitwise operations on n-bit strings (Han et al. 2024), one operation per sequence.

    Args:
        n_bits: string length; the vocabulary is the ``2**n_bits`` strings (1 to 10 bits).
        ops: the operations used, names from ``AND, NAND, OR, NOR, XOR, XNOR, Null``
            (default: all seven). ``Null`` answers with a uniformly random string.
        alpha: fraction of the ``4**n_bits`` (x1, x2) pairs seen in training (1.0: all of them).
        num_shots: examples per sequence (sequence length 3*num_shots - 1).
        batch_size: training sequences per batch.
        balanced: every training batch holds batch_size/len(ops) sequences of each op.
        eval_batch_size, num_eval_batches, seed, num_workers, batch_format, sample_on_device: as in
            :class:`ModularArithmeticDataModule`.

    The concept label is the operation's index in ``OPS`` (``AND``=0 ... ``Null``=6), whichever
    ops are used. Evaluation splits hold every op equally often: ``all`` draws any (x1, x2);
    with ``alpha < 1`` it is replaced by ``seen`` and ``unseen``, pairs from the training and
    from the held-out part.
    """

    def __init__(
        self,
        n_bits: int = 5,
        ops: list[str] | None = None,
        alpha: float = 1.0,
        num_shots: int = 16,
        batch_size: int = 140,
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
        check_positive("n_bits", n_bits)
        if n_bits > MAX_BITS:
            raise ValueError(f"n_bits must be <= {MAX_BITS} (one token per string), got {n_bits}")
        ops = list(OPS) if ops is None else ops
        if isinstance(ops, str) or not ops or any(op not in OPS for op in ops):
            raise ValueError(f"ops must be a non-empty list of names from {OPS}, got {ops!r}")
        ops = list(ops)
        if len(set(ops)) != len(ops):
            raise ValueError(f"ops must not repeat a name, got {ops!r}")
        check_number("alpha", alpha, 0.0, 1.0, low_open=True)
        if round(alpha * 4**n_bits) < 1:
            raise ValueError(f"alpha={alpha} leaves no (x1, x2) pair for training with n_bits={n_bits}")
        check_positive("num_shots", num_shots)
        check_flag("balanced", balanced)
        check_balanced(batch_size, len(ops), "len(ops)", balanced)
        self.n_bits, self.num_shots, self.balanced = n_bits, num_shots, balanced
        self.save_hyperparameters()
        self.ops = torch.tensor([OPS.index(op) for op in ops], dtype=torch.long)
        self.training_tasks, self.input_size = self.ops, n_bits  # what TaskSetSampling draws from
        # the 4**n_bits (x1, x2) pairs, shuffled once; the first round(alpha * 4**n_bits) are seen in training
        self.train_pairs, self.test_pairs = split_inputs(1 << n_bits, alpha, generator_for(seed, "alpha_split"))

    @property
    def task_info(self) -> TaskInfo:
        return TaskInfo(
            kind="tokens",
            seq_len=3 * self.num_shots - 1,
            num_shots=self.num_shots,
            vocab_size=1 << self.n_bits,
            num_token_classes=3,
            token_class_names=["x1", "x2", "y"],
            num_concepts=len(OPS),
            eval_splits=list(self.eval_samplers()),
        )

    sample = staticmethod(sample_sequences)

    def eval_sources(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self.test_pairs.shape[0]:
            return {"seen": (self.ops, self.train_pairs), "unseen": (self.ops, self.test_pairs)}
        return {"all": (self.ops, self.train_pairs)}
