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
    """

    inputs: Tensor
    targets: Tensor
    mask: Tensor
    concept: Tensor
    shot: Tensor
    token_class: Tensor
    split: str = "train"

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def scored_positions(self) -> Tensor:
        """``[B, P]`` indices of the scored positions; every row must score the same count."""
        counts = self.mask.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("scored_positions needs the same number of scored positions in every sequence")
        idx = torch.arange(self.mask.shape[1], device=self.mask.device).expand_as(self.mask)
        return idx[self.mask].view(self.mask.shape[0], -1)
