"""The learning-rate schedule and the weight-decay groups every module trains with."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lightning_icl.optim import decay_groups, lr_factor


def test_warmup_is_linear_from_the_start_factor_to_one():
    factors = [lr_factor(s, 4, 100, 0.2, 0.1, "cosine") for s in range(5)]
    assert factors == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_cosine_decays_to_the_floor_at_the_last_step_and_stays_there():
    args = dict(warmup_steps=10, total_steps=110, warmup_start_factor=0.0, min_lr_factor=0.1, schedule="cosine")
    assert lr_factor(10, **args) == pytest.approx(1.0)
    assert lr_factor(60, **args) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: the midpoint of the cosine
    assert lr_factor(35, **args) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, **args) == pytest.approx(0.1) and lr_factor(500, **args) == pytest.approx(0.1)
    decaying = [lr_factor(s, **args) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decaying))


def test_constant_schedule_holds_one_after_warmup():
    assert [lr_factor(s, 2, 10, 0.5, 0.0, "constant") for s in (0, 1, 2, 9, 50)] == [0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, 2, 10, 0.5, 0.0, "linear")


def test_decay_on_matrices_only_and_frozen_parameters_left_out():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    model[1].bias.requires_grad_(False)
    decay, no_decay = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}
    assert ids(decay) == {id(model[0].weight), id(model[1].weight)}
    assert ids(no_decay) == {id(model[2].weight), id(model[2].bias)}
    optimizer = torch.optim.AdamW([decay, no_decay], lr=1e-3)  # the groups are what AdamW takes
    assert len(optimizer.param_groups) == 2
    with pytest.raises(ValueError, match="weight_decay"):
        decay_groups(model, -1.0)
