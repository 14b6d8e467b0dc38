"""Head attribution against the quantity it estimates: real ablation of each head."""

import json

import lightning as L
import pytest
import torch

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl.adapters import HookAdapter, ICLModuleAdapter
from lightning_icl.callbacks import ConceptDecodability, HeadAblation, HeadAttribution
from lightning_icl.interventions import ablation_effects, head_attribution
from lightning_icl.metrics.functional import spearman


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained until its in-distribution answers are confident (the saturated regime)."""
    L.seed_everything(0)
    data = tiny_modular(num_shots=12, batch_size=64)
    module = tiny_module(data, d_model=64, n_heads=4, lr=3e-3, warmup_steps=20)
    kwargs = trainer_kwargs(tmp_path_factory.mktemp("trained"), max_steps=300, val_check_interval=300, logger=False)
    L.Trainer(**kwargs).fit(module, data)
    return data, module.eval()


@pytest.mark.slow
def test_integrated_attribution_ranks_heads_like_real_mean_ablation(trained):
    data, module = trained
    adapter = ICLModuleAdapter(module)
    for split in (0, 2):  # i.d. tasks (confident answers) and OOD tasks
        batch = data.val_dataloader()[split].dataset[0]
        real = ablation_effects(adapter, batch, "mean").loss_effect
        default = head_attribution(adapter, batch)  # mean ablation, integrated gradients, 2 steps
        assert default.shape == real.shape and spearman(real, default) >= 0.8, split
        assert torch.sign(default.sum()) == torch.sign(real.sum())


@pytest.mark.slow
def test_integrated_attribution_tends_to_the_real_effect_and_the_gradient_does_not(trained):
    """The fundamental theorem of calculus: with enough points the integral is the ablation effect."""
    data, module = trained
    adapter = ICLModuleAdapter(module)
    batch = data.val_dataloader()[0].dataset[0]
    real = ablation_effects(adapter, batch, "mean").loss_effect
    errors = [(head_attribution(adapter, batch, steps=s) - real).abs().max().item() for s in (1, 4, 16)]
    assert errors[2] < errors[0] and errors[2] <= 0.05 * real.abs().max().item(), errors
    # at the clean point the confident model's loss is flat in every gate: far from the real effect
    first_order = head_attribution(adapter, batch, method="gradient")
    assert (first_order - real).abs().max().item() > 5 * errors[2]
    # chunks of heads give the same estimates as all heads at once
    chunked = head_attribution(adapter, batch, steps=4, heads_per_forward=3)
    torch.testing.assert_close(chunked, head_attribution(adapter, batch, steps=4), atol=1e-6, rtol=1e-5)


def test_integrated_attribution_through_hooks_on_a_hugging_face_model():
    from test_hf_models import UserLM, gpt2

    from lightning_icl.adapters import adapter_for

    torch.manual_seed(0)
    adapter = adapter_for(UserLM(gpt2).eval())
    assert isinstance(adapter, HookAdapter)
    batch = tiny_modular(batch_format="causal_lm").val_dataloader()[0].dataset[0]
    real = ablation_effects(adapter, batch, "zero").loss_effect
    est = head_attribution(adapter, batch, mode="zero", steps=16)
    torch.testing.assert_close(est, real, atol=0.05 * real.abs().max().item() + 1e-4, rtol=0)


def test_bad_attribution_arguments_are_named(trained):
    _, module = trained
    adapter = ICLModuleAdapter(module)
    batch = tiny_modular(num_shots=12, batch_size=64).val_dataloader()[0].dataset[0]
    with pytest.raises(ValueError, match="method must be one of"):
        head_attribution(adapter, batch, method="ig")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        head_attribution(adapter, batch, steps=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        head_attribution(adapter, batch, mode="mean_ablate")
    with pytest.raises(ValueError, match="estimates zero ablation only"):
        HeadAttribution(method="training", mode="mean")


def test_ablation_and_attribution_at_one_step_log_their_rank_agreement(tmp_path):
    L.seed_everything(0)
    data = tiny_modular()
    ablation, attribution = HeadAblation(mode="mean"), HeadAttribution(mode="mean")
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=20, logger=False, callbacks=[ablation, attribution]))
    trainer.fit(tiny_module(data), data)
    assert [r["step"] for r in attribution.history] == [r["step"] for r in ablation.history] == [10, 20]
    for a, b in zip(ablation.history, attribution.history, strict=True):
        # the one that records second compares with the other's record of the same step
        assert "rank_agreement" not in a and b["rank_agreement_with"] == "ablation"
        expected = spearman(torch.tensor(a["loss_effect"]), torch.tensor(b["loss_effect_estimate"]))
        assert b["rank_agreement"] == pytest.approx(expected)
    assert attribution.scalars(attribution.history[-1])["rank_agreement"] == attribution.history[-1]["rank_agreement"]


@pytest.mark.parametrize(
    "make", [lambda: ConceptDecodability(k=5, every_n_steps=10, num_batches=2), lambda: HeadAblation(every_n_steps=10)]
)
def test_a_step_is_measured_once_when_cadence_and_validation_coincide(tmp_path, make):
    """every_n_steps equal to the validation interval: one record per step, one line per step in the file."""
    L.seed_everything(0)
    data, callback = tiny_modular(), make()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=30, val_check_interval=10, callbacks=[callback]))
    trainer.fit(tiny_module(data), data)
    assert [r["step"] for r in callback.history] == [10, 20, 30]
    lines = (tmp_path / "lightning_logs" / "version_0" / f"{callback.key}.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_training_attribution_keeps_its_running_sums_in_the_checkpoint(tmp_path):
    L.seed_everything(0)
    data = tiny_modular()
    callback = HeadAttribution(method="training", mode="zero", every_n_steps=8, on_validation=False)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=12, logger=False, callbacks=[callback]))
    trainer.fit(tiny_module(data), data)
    state = callback.state_dict()
    assert state["running_count"] == 4 and torch.is_tensor(state["running_sum"])  # steps 9..12 since the record
    fresh = HeadAttribution(method="training", mode="zero")
    fresh.load_state_dict(state)
    assert fresh._count == 4 and torch.equal(fresh._sum, state["running_sum"])


def test_a_new_run_replaces_an_earlier_runs_file_and_a_resumed_run_keeps_its_records(tmp_path):
    """Without a logger the files go to default_root_dir; runs there never mix."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = tiny_modular()

    def run(max_steps, ckpt_path=None, callbacks=()):
        L.seed_everything(0)
        callback = HeadAblation(every_n_steps=5, on_validation=False)
        kwargs = trainer_kwargs(tmp_path, max_steps=max_steps, logger=False, callbacks=[callback, *callbacks])
        L.Trainer(**kwargs).fit(tiny_module(data), data, ckpt_path=ckpt_path)
        lines = (tmp_path / "ablation.jsonl").read_text().splitlines()
        return callback, [json.loads(line)["step"] for line in lines]

    _, first = run(10)
    assert first == [5, 10]
    with pytest.warns(UserWarning, match="replaced .*ablation.jsonl, left by an earlier run"):
        _, second = run(15, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10)])
    assert second == [5, 10, 15]  # the earlier run's 5 and 10 are gone, not repeated
    resumed, steps = run(20, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=10.ckpt")
    assert steps == [r["step"] for r in resumed.history] == [5, 10, 15, 20]
