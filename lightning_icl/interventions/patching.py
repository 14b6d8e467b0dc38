"""Is the concept representation causal? Task vectors and function-vector heads, by patching.

Two interventions at the *final query* (the token before a sequence's last answer):

- **Concept patching** (Han et al. 2024; Hendel et al. 2023): the mean residual stream of a
  concept at a layer, over prompts of that concept, replaces the final query's residual. Patched
  with the prompt's own concept it should not hurt (and can help); with another concept it
  should hurt; patched into a *zero-shot* prompt (the final query alone, no demonstrations) it
  can supply the concept the demonstrations would have.
- **Function-vector heads** (Todd et al. 2024): each head's mean output at the final query over
  ICL prompts is patched into prompts whose demonstration answers were shuffled across shots;
  the *indirect effect* of a head is how much that restores the answer.

Both work through an :class:`~lightning_icl.adapters.Adapter` and hooks on its hook points
(``blocks.{l}.hook_resid_post``, ``blocks.{l}.attn.hook_z``; :mod:`lightning_icl.hooks`), so on the
package's models and on Hugging Face ones alike; zero-shot and shuffled-answer prompts are built
from batches in either ICL layout: an
:class:`~lightning_icl.tasks.ICLBatch`, or a Hugging Face causal-LM dict (``input_ids`` and
``labels`` with -100 everywhere but the answers, as ``ICLBatch.as_causal_lm`` makes them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_icl.capture import CaptureSpec
from lightning_icl.checks import check_choice, check_flag, check_number, check_optional_positive, index_list
from lightning_icl.tasks.batch import ICLBatch

if TYPE_CHECKING:  # the adapters import the gating rule from this package
    from lightning_icl.adapters import Adapter


def final_query(adapter: Adapter, batch) -> Tensor:
    """``[B]`` position of the token before each sequence's last answer."""
    return adapter.answer_positions(batch)[:, -1]


def final_scores(adapter: Adapter, outputs: Tensor, batch) -> tuple[Tensor, Tensor | None]:
    """Loss ``[B]`` at the last answer, and the probability of the right token ``[B]`` (token tasks)."""
    scored = adapter.score(outputs, batch)
    loss = scored.loss[:, -1].double()
    return loss, None if scored.correct is None else torch.exp(-loss)  # cross-entropy is -log p(answer)


# ---- building prompts ---------------------------------------------------------------------
PROMPT_LAYOUTS = "an ICLBatch or a causal-LM dict with 'input_ids' and 'labels' (-100 but at the answers)"


def _is_causal_lm(batch) -> bool:
    return isinstance(batch, Mapping) and "input_ids" in batch and "labels" in batch


def check_prompt_layout(batch) -> None:
    """Raise ``ValueError`` unless zero-shot and shuffled prompts can be built from ``batch``."""
    if not (isinstance(batch, ICLBatch) or _is_causal_lm(batch)):
        raise ValueError(f"prompts are built from {PROMPT_LAYOUTS}: batch must be one, got a {type(batch).__name__}")


def _answers(batch) -> Tensor:
    """``[B, P]`` index of each answer token in the sequence (the input right after a scored position)."""
    if isinstance(batch, ICLBatch):
        return batch.scored_positions() + 1
    scored = batch["labels"] != -100
    counts = scored.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("prompts need the same number of answers in every sequence")
    idx = torch.arange(scored.shape[1], device=scored.device).expand_as(scored)
    return idx[scored].view(scored.shape[0], -1)


def zero_shot(batch):
    """The final query alone: every token after the second-to-last answer, so no demonstrations."""
    check_prompt_layout(batch)
    answers = _answers(batch)
    if answers.shape[1] < 2:
        return batch
    start = answers[:, -2] + 1
    if not bool((start == start[0]).all()):
        raise ValueError("zero_shot needs the final example to start at the same position in every sequence")
    s = int(start[0])
    if isinstance(batch, ICLBatch):
        return replace(
            batch,
            inputs=batch.inputs[:, s:],
            targets=batch.targets[:, s:],
            mask=batch.mask[:, s:],
            shot=batch.shot[:, s:],
            token_class=batch.token_class[:, s:],
        )
    seq = batch["input_ids"].shape[1]
    per_token = lambda v: isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] == seq
    return {k: v[:, s:] if per_token(v) else v for k, v in batch.items()}


def shuffle_answers(batch, generator: torch.Generator | None = None):
    """Demonstration answers permuted across the shots of each sequence (the query is untouched).

    The answer of shot ``k`` is the input token (or vector) right after the ``k``-th scored
    position; a random permutation per sequence moves them, and the scored targets follow.
    """
    check_prompt_layout(batch)
    answers = _answers(batch)  # [B, P]
    b, p = answers.shape
    if p < 3:
        return batch
    demos = answers[:, :-1]  # where each demonstration's answer sits in the inputs
    perm = torch.rand(b, p - 1, generator=generator).argsort(dim=1).to(answers.device)
    source = torch.gather(demos, 1, perm)
    rows = torch.arange(b, device=answers.device)[:, None]
    if isinstance(batch, ICLBatch):
        inputs, targets = batch.inputs.clone(), batch.targets.clone()
        inputs[rows, demos] = batch.inputs[rows, source]
        targets[rows, demos - 1] = batch.targets[rows, source - 1]
        return replace(batch, inputs=inputs, targets=targets)
    input_ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
    input_ids[rows, demos] = batch["input_ids"][rows, source]
    labels[rows, demos] = batch["labels"][rows, source]
    return {**batch, "input_ids": input_ids, "labels": labels}


# ---- hooks ------------------------------------------------------------------------------------
@contextmanager
def patched_residual(
    adapter: Adapter, layer: int, positions: Tensor, vectors: Tensor, add: bool = False
) -> Iterator[None]:
    """Within the block, the residual after ``layer`` (``blocks.{layer}.hook_resid_post``) at ``positions``
    ``[B]`` becomes ``vectors`` ``[B, D]`` (or has them added, with ``add``)."""

    def patch(h: Tensor) -> Tensor:  # [B, T, D]
        h = h.clone()
        rows = torch.arange(h.shape[0], device=h.device)
        h[rows, positions] = vectors.to(h.dtype) + (h[rows, positions] if add else 0)
        return h

    with adapter.hooks({f"blocks.{layer}.hook_resid_post": patch}):
        yield


@contextmanager
def patched_heads(adapter: Adapter, layer: int, positions: Tensor, heads: Tensor, values: Tensor) -> Iterator[None]:
    """Within the block, head ``heads[i]`` of layer ``layer`` (``blocks.{layer}.attn.hook_z``) outputs
    ``values[i]`` ``[Dh]`` at ``positions[i]`` in row ``i`` (``heads[i] < 0``: row untouched)."""

    def patch(z: Tensor) -> Tensor:  # [B, H, T, Dh]
        z = z.clone()
        rows = (heads >= 0).nonzero()[:, 0]
        if rows.numel():
            z[rows, heads[rows], positions[rows]] = values[rows].to(z.dtype)
        return z

    with adapter.hooks({f"blocks.{layer}.attn.hook_z": patch}):
        yield


# ---- means ------------------------------------------------------------------------------------
@dataclass
class ConceptMeans:
    """Mean residual at the final query per concept: ``sums`` ``[L', C, D]`` over ``counts`` ``[C]``
    (``C`` = largest concept id + 1; a concept with count 0 was not seen) at ``layers``."""

    layers: list[int]
    sums: Tensor
    counts: Tensor

    @property
    def means(self) -> Tensor:
        return self.sums / self.counts.clamp(min=1)[None, :, None]

    @property
    def directions(self) -> Tensor:
        """``[L', C, D]``: each concept's mean less the average of the concepts' means (the task vector
        relative to the average prompt; zero for concepts not seen)."""
        seen = self.counts > 0
        centre = self.means[:, seen].mean(dim=1, keepdim=True)
        return (self.means - centre) * seen[None, :, None]

    @property
    def concepts(self) -> Tensor:
        """The concept ids seen, ascending."""
        return (self.counts > 0).nonzero()[:, 0]


@torch.no_grad()
def concept_means(adapter: Adapter, batches: Iterable, layers: list[int] | None = None) -> ConceptMeans:
    """Per-concept mean residual stream at the final query after each layer in ``layers`` (default all;
    negative indices count from the end)."""
    n_l = adapter.n_layers
    if layers is not None:
        layers = index_list("layers", layers)
        bad = [layer for layer in layers if not -n_l <= layer < n_l]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {n_l} layers")
    layers = list(range(n_l)) if layers is None else sorted({layer % n_l for layer in layers})
    sums = counts = None
    for batch in batches:
        last = final_query(adapter, batch)
        _, cap = adapter.forward(batch, capture=CaptureSpec(layers=layers, residual=True, positions=last[:, None]))
        features = torch.stack([cap.residual[layer][:, 0] for layer in layers]).double()  # [L', B, D]
        concept = adapter.concept(batch).to(features.device)
        size = int(concept.max()) + 1
        if sums is None:
            sums = features.new_zeros(len(layers), size, features.shape[-1])
            counts = features.new_zeros(size)
        elif size > sums.shape[1]:
            sums = torch.nn.functional.pad(sums, (0, 0, 0, size - sums.shape[1]))
            counts = torch.nn.functional.pad(counts, (0, size - counts.shape[0]))
        sums.index_add_(1, concept, features)
        counts.index_add_(0, concept, torch.ones_like(concept, dtype=counts.dtype))
    if sums is None:
        raise ValueError("concept_means got no batches")
    return ConceptMeans(layers, sums, counts)


@torch.no_grad()
def query_head_means(adapter: Adapter, batches: Iterable) -> tuple[Tensor, int]:
    """Sum of every head's output at the final query, ``[L, H, Dh]``, and the number of prompts."""
    total, n = None, 0
    for batch in batches:
        last = final_query(adapter, batch)
        _, cap = adapter.forward(batch, capture=CaptureSpec(heads=True, positions=last[:, None]))
        z = torch.stack([cap.heads[layer][:, :, 0].double().sum(0) for layer in range(adapter.n_layers)])
        total = z if total is None else total + z
        n += last.shape[0]
    if total is None:
        raise ValueError("query_head_means got no batches")
    return total, n


# ---- the interventions ------------------------------------------------------------------------
@dataclass
class PatchingResult:
    """Sums over the ``count`` prompts scored, per layer of ``layers`` (divide by ``count`` for means).

    ``*_loss`` at the last answer: ``clean``, patched with the prompt's ``own`` concept mean, with
    ``other`` concept's mean, the ``zero_shot`` prompt and the zero-shot prompt patched with its own
    concept (``zero_shot_patched``). ``*_prob``: probability of the right token (token tasks).
    """

    layers: list[int]
    count: int
    loss: dict[str, Tensor]
    prob: dict[str, Tensor] | None


PATCH_METHODS = ("shift", "replace")


@torch.no_grad()
def concept_patching(
    adapter: Adapter,
    batch,
    means: ConceptMeans,
    method: str = "shift",
    scale: float = 1.0,
    zero_shot_prompts: bool = True,
) -> PatchingResult:
    """Patch concept means into the final query of ``batch`` at every layer of ``means``.

    ``method="shift"`` adds ``scale`` times the concept's direction (its mean less the average of
    the concepts' means) to the residual, keeping what the position holds about its own token;
    ``"replace"`` overwrites the residual with the concept's mean (Hendel et al.'s task vector, meant
    for a position that holds no token of its own: where the final query is an input token, as in
    modular arithmetic, it also erases that token). Rows whose concept has no mean are left out; the
    "other" concept of a row is the next concept (cyclically) among those with a mean. Zero-shot
    prompts need a batch in one of the ICL layouts (:func:`check_prompt_layout`).
    """
    check_choice("method", method, PATCH_METHODS)
    check_number("scale", scale)
    check_flag("zero_shot_prompts", zero_shot_prompts)
    concepts = means.concepts.to(adapter.concept(batch).device)
    if concepts.numel() < 2:
        raise ValueError("concept_patching needs the means of at least two concepts")
    concept = adapter.concept(batch)
    known = torch.isin(concept, concepts)
    if not bool(known.any()):
        raise ValueError("no sequence of the batch has a concept with a mean")
    where = torch.searchsorted(concepts, concept.clamp(max=int(concepts[-1])))
    other = concepts[(where + 1) % concepts.numel()]
    shift = method == "shift"
    table = (scale * means.directions if shift else means.means).to(device=concept.device)  # [L', C, D]

    def scores(prompt, layer=None, vectors=None):
        pos = final_query(adapter, prompt)
        if layer is None:
            return final_scores(adapter, adapter.forward(prompt)[0], prompt)
        with patched_residual(adapter, layer, pos, vectors, add=shift):
            return final_scores(adapter, adapter.forward(prompt)[0], prompt)

    prompts = {"clean": batch}
    if zero_shot_prompts:
        prompts["zero_shot"] = zero_shot(batch)
    n_layers = len(means.layers)
    loss: dict[str, Tensor] = {}
    prob: dict[str, Tensor] = {}
    is_tokens = True

    def add(name: str, result: tuple[Tensor, Tensor | None], i: int | None = None) -> None:
        nonlocal is_tokens
        lo, pr = result
        is_tokens = is_tokens and pr is not None
        for store, value in ((loss, lo), (prob, pr if pr is not None else torch.zeros_like(lo))):
            if name not in store:
                store[name] = lo.new_zeros(() if i is None else (n_layers,))
            if i is None:
                store[name] += value[known].sum()
            else:
                store[name][i] += value[known].sum()

    for name, prompt in prompts.items():
        add(name, scores(prompt))
    own = concept.clamp(max=table.shape[1] - 1)
    for i, layer in enumerate(means.layers):
        add("own", scores(batch, layer, table[i, own]), i)
        add("other", scores(batch, layer, table[i, other]), i)
        if zero_shot_prompts:
            add("zero_shot_patched", scores(prompts["zero_shot"], layer, table[i, own]), i)
    return PatchingResult(list(means.layers), int(known.sum()), loss, prob if is_tokens else None)


@dataclass
class FunctionVectorResult:
    """Sums over ``count`` shuffled-answer prompts: the last answer's loss with nothing patched
    (``shuffled_loss``) and with each head's mean patched in (``patched_loss`` ``[L, H]``); for token
    tasks the probability of the right answer likewise. Indirect effect = (shuffled - patched) loss,
    or (patched - shuffled) probability, over ``count``."""

    count: int
    shuffled_loss: Tensor
    patched_loss: Tensor
    shuffled_prob: Tensor | None
    patched_prob: Tensor | None

    def indirect_effect(self) -> Tensor:
        """``[L, H]``: probability gained (token tasks) or loss removed (others) by the head's mean."""
        if self.patched_prob is not None:
            return (self.patched_prob - self.shuffled_prob) / self.count
        return (self.shuffled_loss - self.patched_loss) / self.count


@torch.no_grad()
def function_vector_effects(
    adapter: Adapter,
    batch,
    head_means: Tensor,
    heads_per_forward: int | None = None,
    generator: torch.Generator | None = None,
) -> FunctionVectorResult:
    """Indirect effect of every head (Todd et al.): its mean output at the final query
    (``head_means`` ``[L, H, Dh]``, e.g. from :func:`query_head_means`) patched into prompts whose
    demonstration answers are shuffled. All heads go in one forward over the batch replicated per
    head (``heads_per_forward`` bounds it)."""
    check_prompt_layout(batch)
    check_optional_positive("heads_per_forward", heads_per_forward)
    n_l, n_h = adapter.n_layers, adapter.n_heads
    if tuple(head_means.shape) != (n_l, n_h, adapter.head_dim):
        expected = (n_l, n_h, adapter.head_dim)
        raise ValueError(f"head_means must be [L, H, Dh] = {expected}, got {tuple(head_means.shape)}")
    shuffled = shuffle_answers(batch, generator)
    b = adapter.batch_size(shuffled)
    base_loss, base_prob = final_scores(adapter, adapter.forward(shuffled)[0], shuffled)
    heads = [(layer, head) for layer in range(n_l) for head in range(n_h)]
    per = len(heads) if heads_per_forward is None else heads_per_forward
    loss = torch.zeros(n_l, n_h, dtype=torch.float64, device=base_loss.device)
    prob = torch.zeros_like(loss) if base_prob is not None else None
    for start in range(0, len(heads), per):
        chunk = heads[start : start + per]
        copies = adapter.repeat(shuffled, len(chunk))
        pos = final_query(adapter, copies)
        layer_of = torch.tensor([layer for layer, _ in chunk], device=pos.device).repeat_interleave(b)
        head_of = torch.tensor([head for _, head in chunk], device=pos.device).repeat_interleave(b)
        with _all_layers_patched(adapter, pos, layer_of, head_of, head_means):
            lo, pr = final_scores(adapter, adapter.forward(copies)[0], copies)
        for i, (layer, head) in enumerate(chunk):
            loss[layer, head] = lo[i * b : (i + 1) * b].sum()
            if prob is not None:
                prob[layer, head] = pr[i * b : (i + 1) * b].sum()
    return FunctionVectorResult(
        count=b,
        shuffled_loss=base_loss.sum(),
        patched_loss=loss,
        shuffled_prob=None if base_prob is None else base_prob.sum(),
        patched_prob=prob,
    )


@contextmanager
def _all_layers_patched(adapter, positions, layer_of, head_of, head_means) -> Iterator[None]:
    """Row ``i`` gets head ``head_of[i]`` of layer ``layer_of[i]`` replaced by its mean at ``positions[i]``."""
    with ExitStack() as stack:
        for layer in range(adapter.n_layers):
            heads = torch.where(layer_of == layer, head_of, torch.full_like(head_of, -1))
            values = head_means[layer].to(positions.device)[heads.clamp(min=0)]
            stack.enter_context(patched_heads(adapter, layer, positions, heads, values))
        yield
