"""``CaptureSpec`` and ``gather_positions``: what a capture asks for is what it resolves to."""

from __future__ import annotations

import pytest
import torch

from lightning_icl.capture import CaptureSpec, gather_positions


def test_layers_resolve_negative_indices_sorted_and_once():
    assert CaptureSpec().resolve_layers(3) == [0, 1, 2]
    assert CaptureSpec(layers=[-1, 0, 2]).resolve_layers(3) == [0, 2]
    assert CaptureSpec(layers=1).resolve_layers(4) == [1]
    with pytest.raises(ValueError, match="layers: 3 out of range for a model with 3 layers"):
        CaptureSpec(layers=[3]).resolve_layers(3)


def test_position_modes_and_indices_resolve_to_one_row_per_example():
    cpu = torch.device("cpu")
    assert CaptureSpec(positions="all").resolve_positions(2, 4, cpu).tolist() == [[0, 1, 2, 3]] * 2
    assert CaptureSpec(positions="last").resolve_positions(3, 5, cpu).tolist() == [[4]] * 3
    assert CaptureSpec(positions=[1, 3]).resolve_positions(2, 5, cpu).tolist() == [[1, 3], [1, 3]]
    per_row = CaptureSpec(positions=[[0, 2], [1, 4]]).resolve_positions(2, 5, cpu)
    assert per_row.dtype == torch.long and per_row.tolist() == [[0, 2], [1, 4]]
    assert CaptureSpec(positions=2).resolve_positions(1, 5, cpu).tolist() == [[2]]


def test_positions_outside_the_sequence_or_batch_are_refused():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 4\), got \[0, 4\]"):
        CaptureSpec(positions=[0, 4]).resolve_positions(2, 4, cpu)
    with pytest.raises(ValueError, match="has 3 rows for a batch of 2"):
        CaptureSpec(positions=torch.zeros(3, 1, dtype=torch.long)).resolve_positions(2, 4, cpu)
    for bad in (torch.tensor([True, False]), torch.tensor([0.5]), "first", [[0], [1, 2]]):
        with pytest.raises(ValueError, match="positions"):
            CaptureSpec(positions=bad)


def test_stats_are_a_tuple_of_known_names():
    assert CaptureSpec(stats="entropy").stats == ("entropy",)
    assert CaptureSpec(stats=["entropy", "max_prob"]).stats == ("entropy", "max_prob")
    with pytest.raises(ValueError, match="unknown"):
        CaptureSpec(stats=["entropy", "attention_rollout"])


def test_gather_positions_picks_each_rows_own_positions_on_any_axis():
    x = torch.arange(2 * 3 * 5).view(2, 3, 5).float()  # [B, H, T]
    picked = gather_positions(x, torch.tensor([[4, 0], [1, 1]]), dim=2)
    assert picked.shape == (2, 3, 2)
    assert torch.equal(picked[0], x[0][:, [4, 0]]) and torch.equal(picked[1], x[1][:, [1, 1]])
    h = torch.randn(2, 5, 7)  # [B, T, D]
    assert torch.equal(gather_positions(h, torch.tensor([[3], [2]]), dim=1), torch.stack([h[0, 3:4], h[1, 2:3]]))
