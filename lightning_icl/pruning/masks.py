"""Hard-concrete L0 masks (Louizos et al. 2018).

The gates :class:`~lightning_icl.pruning.SubnetworkPruning` learns over heads and MLPs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_icl.checks import check_number, index_list, is_number


class HardConcrete(nn.Module):
    """Hard-concrete gates z in [0, 1], one per unit of ``shape``, with a closed-form L0 norm.

    A sample stretches a binary-concrete variable to ``(l, r)`` and clips it to [0, 1], so it
    is exactly 0 or 1 with non-zero probability yet differentiable in ``log_alpha``:
    ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, ``z = clip(s (r - l) + l, 0, 1)``,
    ``u ~ U(0, 1)`` (Louizos et al. 2018).

    Args:
        shape: the units, e.g. ``(L, H)`` for heads.
        beta: temperature (2/3).
        stretch: ``(l, r)`` with ``l < 0`` and ``r > 1`` ((-0.1, 1.1)).
        init_mean, init_std: ``log_alpha ~ N(init_mean, init_std)``; 10 starts with every unit kept.
    """

    def __init__(
        self,
        shape: int | Sequence[int],
        beta: float = 2 / 3,
        stretch: tuple[float, float] = (-0.1, 1.1),
        init_mean: float = 10.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        shape = index_list("shape", shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"shape must be one or more sizes >= 1, got {shape}")
        shape = tuple(shape)
        check_number("beta", beta, low=0.0, low_open=True)
        pair = list(stretch) if isinstance(stretch, (tuple, list)) else []
        finite = len(pair) == 2 and all(is_number(x) and math.isfinite(x) for x in pair)
        if not finite or not pair[0] < 0 < 1 < pair[1]:
            raise ValueError(f"stretch must be (l, r) with l < 0 < 1 < r, got {stretch!r}")
        low, high = pair
        check_number("init_mean", init_mean)
        check_number("init_std", init_std, low=0.0)
        self.beta, self.low, self.high = beta, low, high
        self.log_alpha = nn.Parameter(torch.empty(shape).normal_(init_mean, init_std))

    def sample(self, batch_shape: Sequence[int] = (), generator: torch.Generator | None = None) -> Tensor:
        """``[*batch_shape, *shape]`` reparameterised samples (gradients reach ``log_alpha``)."""
        shape = (*batch_shape, *self.log_alpha.shape)
        u = torch.rand(shape, generator=generator, device=self.log_alpha.device)
        u = u.clamp(1e-6, 1 - 1e-6)  # log u - log(1 - u) stays finite
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def deterministic(self) -> Tensor:
        """The test-time gate ``clip(sigmoid(log_alpha) (r - l) + l, 0, 1)``, in [0, 1]."""
        return (torch.sigmoid(self.log_alpha) * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def binary(self) -> Tensor:
        """Kept (True) or pruned (False) per unit: the deterministic gate above 1/2."""
        return self.deterministic() > 0.5

    def expected_l0(self) -> Tensor:
        """``P(z != 0)`` per unit: ``sigmoid(log_alpha - beta log(-l / r))``."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.low / self.high))
