"""Concept patching and function-vector heads: the hooks do exactly what they say; prompts are built right."""

import lightning as L
import pytest
import torch

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl import CaptureSpec, ConceptPatching
from lightning_icl.adapters import ICLModuleAdapter
from lightning_icl.interventions.patching import (
    concept_means,
    concept_patching,
    final_query,
    final_scores,
    function_vector_effects,
    patched_heads,
    patched_residual,
    query_head_means,
    shuffle_answers,
    zero_shot,
)


def setup(seed=0):
    torch.manual_seed(seed)
    data = tiny_modular(num_eval_batches=4)
    module = tiny_module(data).eval()
    batches = [data.val_dataloader()[0].dataset[i] for i in range(4)]
    return module, ICLModuleAdapter(module), batches


def test_patching_the_residual_with_itself_changes_nothing_and_only_downstream_positions_move():
    module, adapter, (batch, *_) = setup()
    last = final_query(adapter, batch)
    clean, cap = module(batch, capture=CaptureSpec(residual=True, positions=last[:, None]))
    with torch.no_grad(), patched_residual(adapter, 0, last, cap.residual[0][:, 0]):
        same, _ = module(batch)
    torch.testing.assert_close(same, clean)
    with torch.no_grad(), patched_residual(adapter, 0, last, torch.randn(len(batch), 32)):
        moved, _ = module(batch)
    rows = torch.arange(len(batch))
    assert (moved[rows, last] - clean[rows, last]).abs().amax() > 1e-3
    before = torch.arange(batch.inputs.shape[1]) < last.min()
    torch.testing.assert_close(moved[:, before], clean[:, before])  # causal: nothing earlier changes
    # replacing the last block's output sets the read-out input itself
    vec = torch.randn(len(batch), 32)
    with torch.no_grad(), patched_residual(adapter, 1, last, vec):
        out, _ = module(batch)
    torch.testing.assert_close(out[rows, last], module.model.read_outputs(vec))
    # adding
    with torch.no_grad(), patched_residual(adapter, 1, last, vec, add=True):
        out, _ = module(batch)
    torch.testing.assert_close(out[rows, last], module.model.read_outputs(cap.residual[1][:, 0] + vec))


def test_patching_a_head_at_one_position_equals_gating_it_to_a_per_position_value():
    module, adapter, (batch, *_) = setup()
    last = final_query(adapter, batch)
    _, cap = module(batch, capture=CaptureSpec(heads=True, positions="all"))
    value = torch.randn(16)
    with torch.no_grad(), patched_heads(adapter, 1, last, torch.full((len(batch),), 1), value.expand(len(batch), 16)):
        patched, _ = module(batch)
    # the same through the model's own gating: head L1H1 replaced by its z everywhere except at the query
    mu = torch.stack([cap.heads[layer].mean(dim=0) for layer in range(2)])  # [L, H, T, Dh] (only L1H1 used)
    rows = torch.arange(len(batch))
    per_row = []
    for i in range(len(batch)):
        m = mu.clone()
        m[1, 1] = cap.heads[1][i, 1]
        m[1, 1, last[i]] = value
        gates = torch.ones(2, 2)
        gates[1, 1] = 0
        per_row.append(module(batch, head_gates=gates, ablate_with=m)[0][i])
    torch.testing.assert_close(patched, torch.stack(per_row))
    assert (patched[rows, last] - module(batch)[0][rows, last]).abs().amax() > 1e-4


def test_zero_shot_and_shuffled_prompts():
    _, _, (batch, *_) = setup()
    zs = zero_shot(batch)
    assert zs.inputs.shape[1] == 2 and zs.mask.sum(1).tolist() == [1] * len(batch)  # "x y" -> z
    torch.testing.assert_close(zs.inputs, batch.inputs[:, -2:])
    torch.testing.assert_close(zs.targets[zs.mask], batch.targets[:, -1])
    sh = shuffle_answers(batch, torch.Generator().manual_seed(0))
    pos = batch.scored_positions()
    demos = pos[:, :-1] + 1
    rows = torch.arange(len(batch))[:, None]
    assert not torch.equal(sh.inputs, batch.inputs)
    for i in range(len(batch)):  # the same answers, moved between shots; the queries untouched
        assert sorted(sh.inputs[i, demos[i]].tolist()) == sorted(batch.inputs[i, demos[i]].tolist())
    others = torch.ones_like(batch.inputs, dtype=torch.bool)
    others[rows, demos] = False
    torch.testing.assert_close(sh.inputs[others], batch.inputs[others])
    torch.testing.assert_close(sh.targets[rows, pos[:, :-1]], sh.inputs[rows, demos])  # targets follow
    torch.testing.assert_close(sh.targets[:, -1], batch.targets[:, -1])


def test_concept_means_are_the_means_per_concept():
    module, adapter, batches = setup()
    means = concept_means(adapter, batches[:2])
    feats, labels = [], []
    for b in batches[:2]:
        last = final_query(adapter, b)
        _, cap = module(b, capture=CaptureSpec(residual=True, positions=last[:, None]))
        feats.append(cap.residual[1][:, 0])
        labels.append(b.concept)
    feats, labels = torch.cat(feats).double(), torch.cat(labels)
    assert means.concepts.tolist() == sorted(labels.unique().tolist())
    for c in means.concepts.tolist():
        torch.testing.assert_close(means.means[1, c], feats[labels == c].mean(0))
    torch.testing.assert_close(means.directions[:, means.concepts].mean(1), torch.zeros(2, 32, dtype=torch.float64))


def test_function_vector_effects_equal_patching_each_head_by_hand():
    module, adapter, batches = setup()
    z_sum, n = query_head_means(adapter, batches[:2])
    head_means = (z_sum / n).float()
    g = torch.Generator().manual_seed(3)
    result = function_vector_effects(adapter, batches[2], head_means, generator=g)
    shuffled = shuffle_answers(batches[2], torch.Generator().manual_seed(3))
    base = final_scores(adapter, module(shuffled)[0], shuffled)[1]
    last = final_query(adapter, shuffled)
    b = len(shuffled)
    for layer in range(2):
        for head in range(2):
            with (
                torch.no_grad(),
                patched_heads(adapter, layer, last, torch.full((b,), head), head_means[layer, head].expand(b, -1)),
            ):
                prob = final_scores(adapter, module(shuffled)[0], shuffled)[1]
            assert result.indirect_effect()[layer, head].item() == pytest.approx((prob - base).mean().item(), abs=1e-6)


@pytest.mark.slow
def test_patching_on_a_trained_model(tmp_path):
    L.seed_everything(0)
    data = tiny_modular(num_shots=12, batch_size=64, num_eval_batches=8)
    module = tiny_module(data, d_model=64, n_heads=4, lr=3e-3, warmup_steps=20)
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=300, val_check_interval=300, logger=False)).fit(module, data)
    module.eval()
    adapter = ICLModuleAdapter(module)
    batches = [data.val_dataloader()[0].dataset[i] for i in range(8)]
    means = concept_means(adapter, batches[:4])
    shift = [concept_patching(adapter, b, means, "shift") for b in batches[4:]]
    replace = [concept_patching(adapter, b, means, "replace") for b in batches[4:]]
    mean = lambda results, key: sum(r.loss[key] for r in results) / sum(r.count for r in results)
    clean = mean(shift, "clean")
    assert clean < 1.0  # the model does the task in context
    # a prompt's own concept direction, added at the final query, leaves its answer about as it was ...
    assert (mean(shift, "own") - clean).abs().max() < 0.1 * clean
    # ... while overwriting the final query (the token y of "x y") with any mean erases what it holds
    assert (mean(replace, "own") > 2 * clean).all()


def test_concept_patching_callback_records_and_draws(tmp_path):
    L.seed_everything(0)
    data = tiny_modular(num_eval_batches=4)
    patching = ConceptPatching(num_batches=4)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, limit_val_batches=4, logger=False, callbacks=[patching]))
    trainer.fit(tiny_module(data), data)
    record = patching.history[-1]
    assert record["step"] == 20 and record["layers"] == [0, 1] and record["count"] == 2 * 16
    for key in ("loss/own", "loss/other", "loss/zero_shot_patched", "prob/own"):
        assert len(record[key]) == 2
    assert len(record["fv_effect"]) == 2 and len(record["fv_top_heads"]) == 4
    assert (tmp_path / "patching.jsonl").exists() and (tmp_path / "figures" / "patching.png").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(num_batches=1), "num_batches must be >= 2"), (dict(method="swap"), "method must be")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConceptPatching(**kwargs)
