"""Hard-concrete masks: sampled L0 fraction, deterministic masks, gradients, argument checks."""

import math

import pytest
import torch

from lightning_icl.pruning import HardConcrete


def test_sampled_nonzero_fraction_matches_expected_l0():
    gate = HardConcrete(5)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    n = 40_000
    z = gate.sample((n,), generator=torch.Generator().manual_seed(0))  # [n, 5]
    p = gate.expected_l0().detach()
    # the fraction of n Bernoulli(p) draws has std sqrt(p (1 - p) / n) <= 0.0025; 5 std: a false
    # failure about once in 10^6 runs (and the generator is fixed)
    tolerance = 5 * torch.sqrt(p * (1 - p) / n)
    assert torch.all(((z > 0).double().mean(0) - p).abs() <= tolerance)
    # the other end: P(z = 1) = sigmoid(log_alpha - beta log((1 - l) / (r - 1)))
    p_one = torch.sigmoid(gate.log_alpha.detach() - gate.beta * math.log(1.1 / 0.1))
    assert torch.all(((z == 1).double().mean(0) - p_one).abs() <= 5 * torch.sqrt(p_one * (1 - p_one) / n))
    assert torch.all((z >= 0) & (z <= 1))


def test_deterministic_mask_binary_mask_and_init():
    gate = HardConcrete((3, 4))
    assert gate.log_alpha.shape == (3, 4)
    log_alpha = gate.log_alpha.detach()
    assert abs(float(log_alpha.mean()) - 10.0) < 0.05 and float(log_alpha.std()) < 0.05
    assert torch.all(gate.binary()) and torch.allclose(gate.expected_l0(), torch.ones(3, 4))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-8, 8, 12).view(3, 4))
    det = gate.deterministic()
    assert torch.all((det >= 0) & (det <= 1)) and det.min() == 0 and det.max() == 1
    torch.testing.assert_close(gate.binary(), gate.log_alpha > 0)  # det > 1/2 <=> log_alpha > 0 for (l, r) symmetric


def test_gradients_reach_log_alpha():
    gate = HardConcrete(4, init_mean=0.0)
    (gate.sample((64,)).sum() + gate.expected_l0().sum() + gate.deterministic().sum()).backward()
    assert gate.log_alpha.grad is not None and torch.all(gate.log_alpha.grad.abs() > 0)


@pytest.mark.parametrize(
    "kwargs, message", [(dict(beta=0), "beta"), (dict(stretch=(0.0, 1.1)), "stretch"), (dict(init_std=-1), "init_std")]
)
def test_bad_hard_concrete_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HardConcrete(3, **kwargs)
