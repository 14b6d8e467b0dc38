"""Keep frequency, the heuristic core and the effective size of a set of pruned subnetworks."""

import pytest
import torch

from lightning_icl.pruning import effective_size, heuristic_core, keep_frequency


def test_keep_frequency_and_heuristic_core():
    masks = [
        torch.tensor([[1, 0], [1, 1]]),
        torch.tensor([[1, 1], [0, 1]]),
        torch.tensor([[1, 0], [0, 1]]),
        torch.tensor([[1, 0], [1, 0]]),
    ]
    torch.testing.assert_close(keep_frequency(masks), torch.tensor([[1.0, 0.25], [0.5, 0.75]], dtype=torch.float64))
    assert heuristic_core(masks).tolist() == [[True, False], [False, False]]
    assert heuristic_core(masks, fraction=0.75).tolist() == [[True, False], [False, True]]
    assert heuristic_core([[[1, 1]], [[1, 1]], [[0, 1]]], fraction=2 / 3).tolist() == [[True, True]]
    with pytest.raises(ValueError, match="fraction"):
        heuristic_core(masks, fraction=0)
    with pytest.raises(ValueError, match="empty"):
        keep_frequency([])


def record(target, achieved, acc):
    return {"target_sparsity": target, "sparsity": achieved, "accuracy": {"id": acc, "ood": acc - 0.5}}


def test_effective_size():
    results = [
        record(0.3, 0.30, 0.95),
        record(0.3, 0.32, 0.97),  # mean 0.96, within 0.03 of 0.98 at mean sparsity 0.31
        record(0.5, 0.50, 0.96),
        record(0.5, 0.52, 0.94),  # mean 0.95: within 0.03 at mean sparsity 0.51
        record(0.7, 0.70, 0.99),
        record(0.7, 0.70, 0.80),  # mean 0.895: out
    ]
    assert effective_size(results, {"id": 0.98}, split="id") == pytest.approx(49.0)
    assert effective_size(results, 0.98, margin=0.01, split="id") == pytest.approx(100.0)  # none qualifies
    assert effective_size(results, 0.9, split="id") == pytest.approx(30.0)  # all qualify; largest is 0.70
    assert effective_size(results, {"id": 0.98, "ood": 0.46}, split="ood") == pytest.approx(49.0)
    with pytest.raises(ValueError, match="split 'x'"):
        effective_size(results, 0.9, split="x")
