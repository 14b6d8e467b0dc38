import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl.adapters import ICLModuleAdapter
from lightning_icl.callbacks import AttentionStatistics, ConceptDecodability, HeadAblation, HeadAttribution, ICLCurves
from lightning_icl.interventions import ablation_effects, gate_gradients


def all_callbacks():
    return [
        ConceptDecodability(k=5, probe=True, by_shot=True, num_batches=2),
        HeadAblation(mode="mean", num_batches=1),
        HeadAttribution(every_n_steps=5),
        AttentionStatistics(every_n_steps=5),
        ICLCurves(by_concept=True, num_batches=2),
    ]


def fit(tmp_path, callbacks, max_steps=20, seed=0, logger=True, **kw):
    L.seed_everything(seed)
    data = tiny_modular()
    module = tiny_module(data)
    log = CSVLogger(str(tmp_path), name="run") if logger else False
    trainer = L.Trainer(
        **trainer_kwargs(
            tmp_path, max_steps=max_steps, val_check_interval=10, logger=log, callbacks=list(callbacks), **kw
        )
    )
    trainer.fit(module, data)
    return module, trainer


def test_every_callback_records_logs_and_plots(tmp_path):
    callbacks = all_callbacks()
    fit(tmp_path, callbacks)
    cd, ablation, attribution, attention, curves = callbacks
    run = tmp_path / "run" / "version_0"
    # decodability: one record per validation, CD per layer in [0, 1]
    assert [r["step"] for r in cd.history] == [10, 20]
    rec = cd.history[-1]
    assert len(rec["cd"]) == 2 and all(0 <= v <= 1 for v in rec["cd"]) and rec["peak"] == max(rec["cd"])
    assert rec["num_points"] == 2 * 16 and len(rec["probe"]) == 2
    assert len(rec["cd_by_shot"]) == 2 and len(rec["cd_by_shot"][0]) == 8  # [L][shots]
    assert [row[-1] for row in rec["cd_by_shot"]] == pytest.approx(rec["cd"])  # the last shot is the final query
    # ablation: [L, H] effects and clean values
    rec = ablation.history[-1]
    assert torch.tensor(rec["loss_effect"]).shape == (2, 2) and rec["mode"] == "mean" and rec["clean_acc"] is not None
    # attribution every 5 steps and at validation
    assert [r["step"] for r in attribution.history] == [5, 10, 15, 20]
    assert torch.tensor(attribution.history[-1]["loss_effect_estimate"]).shape == (2, 2)
    # attention statistics every 5 steps from the training step itself
    assert [r["step"] for r in attention.history] == [5, 10, 15, 20]
    rec = attention.history[-1]
    mass = torch.tensor(rec["class_mass"])  # [L, H, 3]
    assert mass.shape == (2, 2, 3)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 2), atol=1e-5, rtol=0)
    assert all(0 <= v <= 1 for row in rec["previous_token"] for v in row)
    assert all(v >= 0 for row in rec["entropy"] for v in row)
    # curves: four splits, per shot and per concept
    rec = curves.history[-1]
    assert set(rec["splits"]) == {"id_seen", "id_unseen", "ood_seen", "ood_unseen"}
    assert len(rec["splits"]["id_seen"]["acc"]) == 8 and len(rec["splits"]["id_seen"]["loss_by_concept"]) == 4
    # files
    for name in ("decodability", "ablation", "attribution", "attention", "curves"):
        lines = (run / f"{name}.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == 20
    # the module's own per-shot log stays its own (the report reads it)
    assert all("by_shot" in json.loads(line) for line in (run / "icl_curves.jsonl").read_text().splitlines())
    for name in ("decodability", "ablation", "attribution", "attention"):
        assert (run / "figures" / f"{name}.png").exists()
    logged = (run / "metrics.csv").read_text().splitlines()[0]
    assert "decodability/peak" in logged and "ablation/L1H0" in logged and "attention/entropy/L0H1" in logged


def test_icl_curves_agree_with_the_module(tmp_path):
    curves = ICLCurves(num_batches=2)
    module, _ = fit(tmp_path, [curves], logger=False)
    split = curves.history[-1]["splits"]["id_seen"]
    assert split["acc"][0] == pytest.approx(module.last_eval["val/id_seen/acc_shot0"], abs=1e-6)
    assert split["loss"][-1] == pytest.approx(module.last_eval["val/id_seen/loss_last"], abs=1e-5)


def test_icl_curves_read_the_validation_pass_without_forwards_of_their_own(tmp_path, monkeypatch):
    from lightning_icl import ICLModule

    calls = []
    forward = ICLModule.forward
    monkeypatch.setattr(ICLModule, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    fit(tmp_path / "a", [], logger=False)
    plain = len(calls)
    calls.clear()
    at_validation = ICLCurves(by_concept=True)
    # the same measurement by running the batches itself, at the same steps (validation every 10)
    by_itself = ICLCurves(by_concept=True, every_n_steps=10, on_validation=False, num_batches=2, tag="steps")
    fit(tmp_path / "b", [at_validation, by_itself], logger=False)
    assert len(calls) == plain + 2 * 4 * 2  # only by_itself adds forwards: 2 times, 4 loaders, 2 batches
    assert [r["step"] for r in at_validation.history] == [r["step"] for r in by_itself.history] == [10, 20]
    for a, b in zip(at_validation.history, by_itself.history, strict=True):
        assert a["splits"].keys() == b["splits"].keys()
        for split, curves in a["splits"].items():
            assert curves["loss"] == pytest.approx(b["splits"][split]["loss"], abs=1e-6)
            assert curves["acc"] == pytest.approx(b["splits"][split]["acc"], abs=1e-6)
            for concept, curve in curves["loss_by_concept"].items():
                assert curve == pytest.approx(b["splits"][split]["loss_by_concept"][concept], abs=1e-6)
    # two of one class keep separate files and checkpoint state
    assert len((tmp_path / "b" / "curves_steps.jsonl").read_text().splitlines()) == 2
    assert at_validation.state_key != by_itself.state_key


def test_callbacks_do_not_change_training(tmp_path):
    plain, _ = fit(tmp_path / "a", [], logger=False)
    observed, _ = fit(tmp_path / "b", all_callbacks(), logger=False)
    for a, b in zip(plain.parameters(), observed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_batched_ablation_equals_ablating_each_head_by_hand(modular_data, mode):
    torch.manual_seed(0)
    module = tiny_module(modular_data).eval()
    adapter = ICLModuleAdapter(module)
    batch = modular_data.val_dataloader()[0].dataset[0]
    result = ablation_effects(adapter, batch, mode)
    one_by_one = ablation_effects(adapter, batch, mode, heads_per_forward=1)
    torch.testing.assert_close(result.loss_effect, one_by_one.loss_effect, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        clean = adapter.score(module(batch)[0], batch).loss.double().mean()
        mu = {"zero": None, "resample": "resample"}.get(mode)
        if mode == "mean":
            from lightning_icl.interventions import head_means

            mu = head_means(adapter, batch)
        for layer in range(2):
            for head in range(2):
                gates = torch.ones(2, 2)
                gates[layer, head] = 0
                ablated = adapter.score(module(batch, head_gates=gates, ablate_with=mu)[0], batch).loss.double().mean()
                assert result.loss_effect[layer, head].item() == pytest.approx((ablated - clean).item(), abs=1e-5)


def test_shared_ablation_pass_scores_regression_models_too():
    from lightning_icl import SparseLinearRegressionDataModule

    data = SparseLinearRegressionDataModule(dim=4, num_bases=2, rank=2, num_shots=5, batch_size=8, num_eval_batches=1)
    module = tiny_module(data).eval()
    adapter = ICLModuleAdapter(module)
    batch = data.val_dataloader()[0].dataset[0]
    result = ablation_effects(adapter, batch, "resample")
    assert result.acc_effect is None
    with torch.no_grad():
        clean = adapter.score(module(batch)[0], batch).loss.double().mean()
        for layer, head in ((0, 1), (1, 0)):
            gates = torch.ones(2, 2)
            gates[layer, head] = 0
            ablated = adapter.score(module(batch, head_gates=gates, ablate_with="resample")[0], batch).loss
            effect = (ablated.double().mean() - clean).item()
            assert result.loss_effect[layer, head].item() == pytest.approx(effect, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_attribution_is_the_first_order_ablation_effect_on_a_trained_model(tmp_path, mode):
    from lightning_icl.interventions import head_means

    L.seed_everything(0)
    data = tiny_modular(num_shots=12, batch_size=64)
    module = tiny_module(data, d_model=64, n_heads=4, lr=3e-3, warmup_steps=20)
    L.Trainer(**trainer_kwargs(tmp_path, max_steps=300, val_check_interval=300, logger=False)).fit(module, data)
    module.eval()
    adapter = ICLModuleAdapter(module)
    batch = data.val_dataloader()[1].dataset[0]
    mu = head_means(adapter, batch) if mode == "mean" else None
    attribution = -gate_gradients(adapter, batch, mu).double().flatten()
    # a small ablation (gate 1 -> 0.95) of each head, scaled up to a whole one
    small = ablation_effects(adapter, batch, mode, gate=0.95).loss_effect.flatten() / 0.05
    rank = lambda x: x.argsort().argsort().double()
    assert torch.corrcoef(torch.stack([rank(small), rank(attribution)]))[0, 1] > 0.9
    clear = small.abs() > 0.05 * small.abs().max()
    assert (torch.sign(small[clear]) == torch.sign(attribution[clear])).all()
    assert (small - attribution).abs().max() < 0.2 * small.abs().max()


def test_checkpoint_resume_keeps_callback_state(tmp_path):
    straight = [ConceptDecodability(k=5, num_batches=2), HeadAttribution(every_n_steps=5)]
    fit(tmp_path / "a", straight, max_steps=30, logger=False)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1)  # saved after each validation
    fit(
        tmp_path / "b",
        [ConceptDecodability(k=5, num_batches=2), HeadAttribution(every_n_steps=5), ckpt],
        max_steps=10,
        logger=False,
    )
    resumed = [ConceptDecodability(k=5, num_batches=2), HeadAttribution(every_n_steps=5)]
    L.seed_everything(0)
    data = tiny_modular()
    module = tiny_module(data)
    trainer = L.Trainer(
        **trainer_kwargs(tmp_path / "c", max_steps=30, val_check_interval=10, logger=False, callbacks=list(resumed))
    )
    trainer.fit(module, data, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=10.ckpt"))
    for a, b in zip(straight, resumed, strict=True):
        assert [r["step"] for r in a.history] == [r["step"] for r in b.history]
    assert resumed[0].history[0]["cd"] == pytest.approx(straight[0].history[0]["cd"])
    assert resumed[0].history[-1]["cd"] == pytest.approx(straight[0].history[-1]["cd"], abs=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ConceptDecodability(k=0), "k must be an integer >= 1"),
        (lambda: ConceptDecodability(distance="l1"), "distance must be one of"),
        (lambda: HeadAblation(mode="knockout"), "mode must be one of"),
        (lambda: HeadAblation(heads_per_forward=0), "heads_per_forward"),
        (lambda: ICLCurves(num_batches=0), "num_batches must be an integer >= 1"),
        (lambda: ICLCurves(tag="a/b"), "tag must be"),
        (lambda: AttentionStatistics(stats=("pattern",)), "unknown"),
        (lambda: HeadAttribution(every_n_steps=0), "every_n_steps"),
    ],
)
def test_bad_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()
