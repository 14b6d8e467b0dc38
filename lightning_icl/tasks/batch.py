"""The one batch type shared by every ICL task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ICLBatch:
    """A batch of in-context learning sequences.

    Attributes:
        inputs: token ids ``[B, T]`` (long) or vectors ``[B, T, D_in]`` (float).
        targets: next-token ids ``[B, T]`` (long) or regression targets ``[B, T]`` (float),
            meaningful only where ``mask`` is True.
        mask: ``[B, T]`` bool, the scored positions (answers).
        concept: ``[B]`` long, the latent concept of each sequence (task id, basis id ...).
        shot: ``[B, T]`` long, the example index of each scored position, -1 elsewhere.
        token_class: ``[B, T]`` long, the role of each input position (e.g. x=0, y=1, z=2),
            used for attention class-mass statistics.
        split: name of the split the batch comes from (``"train"``, ``"id_seen"`` ...).
        family: ``[B]`` long, the task family of each sequence when several families share a run
            (an index into ``MultiFamilyDataModule.family_names``); None for a single family.
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    concept: Tensor
    shot: Tensor
    token_class: Tensor
    split: str = "train"
    family: Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def as_causal_lm(self) -> dict[str, Tensor]:
        """The batch in the Hugging Face causal-LM convention (token tasks only).

        ``input_ids`` ``[B, T+1]`` (inputs plus the final target), ``labels`` the same tokens with
        -100 everywhere but the answers (the model shifts them itself), ``concept`` ``[B]`` and
        ``split`` (a name); ``family`` ``[B]`` too when the batch has one.
        """
        if self.inputs.is_floating_point():
            raise ValueError("as_causal_lm needs a token task; this batch holds vectors")
        input_ids = torch.cat([self.inputs, self.targets[:, -1:]], dim=1)
        labels = torch.full_like(input_ids, -100)
        labels[:, 1:][self.mask] = self.targets[self.mask]
        out = {"input_ids": input_ids, "labels": labels, "concept": self.concept, "split": self.split}
        if self.family is not None:
            out["family"] = self.family
        return out

    def scored_positions(self) -> Tensor:
        """``[B, P]`` indices of the scored positions; every row must score the same count."""
        counts = self.mask.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("scored_positions needs the same number of scored positions in every sequence")
        idx = torch.arange(self.mask.shape[1], device=self.mask.device).expand_as(self.mask)
        return idx[self.mask].view(self.mask.shape[0], -1)
