"""SubnetworkPruning: masks and multipliers train, the model does not; a planted head is always kept."""

import json
from functools import partial

import lightning as L
import pytest
import torch

from conftest import tiny_modular, tiny_module, trainer_kwargs
from lightning_icl import ICLBatch, ICLModule
from lightning_icl.adapters import ICLModuleAdapter
from lightning_icl.capture import CaptureSpec
from lightning_icl.pruning import SubnetworkPruning, heuristic_core
from lightning_icl.tasks.base import ICLDataModule, TaskInfo


def copy_batch(gen, index, *, vocab, seq_len, batch_size, split):
    """Random tokens; at every odd position the answer is the token before it."""
    inputs = torch.randint(vocab, (batch_size, seq_len), generator=gen)
    targets = torch.roll(inputs, 1, dims=1)
    pos = torch.arange(seq_len)
    mask = (pos % 2 == 1).expand(batch_size, seq_len).clone()
    return ICLBatch(
        inputs=inputs,
        targets=targets,
        mask=mask,
        concept=torch.zeros(batch_size, dtype=torch.long),
        shot=torch.where(mask, pos // 2, -1),
        token_class=(pos % 2).expand(batch_size, seq_len).clone(),
        split=split,
    )


class CopyDataModule(ICLDataModule):
    """Copy the previous token: no answer is possible without attention to the position before."""

    def __init__(self, vocab: int = 16, seq_len: int = 12, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(batch_size, None, 2, seed, 0)
        self.vocab, self.seq_len = vocab, seq_len
        self.save_hyperparameters()

    @property
    def task_info(self) -> TaskInfo:
        return TaskInfo(
            kind="tokens",
            seq_len=self.seq_len,
            num_shots=self.seq_len // 2,
            vocab_size=self.vocab,
            eval_splits=["copy"],
        )

    def _sampler(self, split):
        return partial(copy_batch, vocab=self.vocab, seq_len=self.seq_len, batch_size=self.batch_size, split=split)

    def train_sampler(self):
        return self._sampler("train")

    def eval_samplers(self):
        return {"copy": self._sampler("copy")}


# the frozen model is in eval mode on purpose
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")

PLANTED = (0, 2)  # layer 0, head 2: the only head open while the model trains


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 1-layer, 4-head model trained to copy with every head but PLANTED zero-ablated."""
    L.seed_everything(0, verbose=False)
    data = CopyDataModule()
    module = ICLModule.from_kwargs(
        task=data.task_info, d_model=64, n_layers=1, n_heads=4, positional="learned", lr=1e-2, warmup_steps=10
    )
    gates = torch.zeros(1, 4)
    gates[PLANTED] = 1.0
    adapter = ICLModuleAdapter(module)
    adapter.set_training_gates(gates)
    trainer = L.Trainer(**trainer_kwargs(tmp_path_factory.mktemp("planted"), max_steps=200, logger=False))
    trainer.fit(module, data)
    adapter.set_training_gates(None)
    return module, data


def fit_pruner(pruner, data, tmp_path, steps, **overrides):
    kwargs = trainer_kwargs(tmp_path, max_steps=steps, val_check_interval=steps, num_sanity_val_steps=0)
    kwargs.update(overrides)
    L.Trainer(**kwargs).fit(pruner, data)
    return pruner


@pytest.mark.slow
def test_planted_head_is_in_every_subnetwork_and_in_the_core(planted, tmp_path):
    module, data = planted
    batch = data.eval_samplers()["copy"](torch.Generator().manual_seed(1), 0)
    logits, _ = module.model(batch.inputs)
    assert (logits[batch.mask].argmax(-1) == batch.targets[batch.mask]).float().mean() > 0.9  # it learned to copy
    masks = []
    for seed in range(3):
        L.seed_everything(seed, verbose=False)
        pruner = SubnetworkPruning(module, target_sparsity=0.6, warmup_steps=60, lr=0.3, weighting="units", seed=seed)
        fit_pruner(pruner, data, tmp_path / str(seed), steps=120, logger=False)
        heads, _ = pruner.kept()
        assert heads[PLANTED], f"seed {seed} pruned the planted head: {heads.int().tolist()}"
        assert pruner.sparsity() >= 0.4  # it did prune: at most 3 of the 5 units kept
        assert pruner.last_result["accuracy"]["copy"] > 0.9  # and the subnetwork still copies
        masks.append(heads)
    assert heuristic_core(masks)[PLANTED]


def test_lambda_ascent_follows_the_sparsity_gap(modular_data):
    module = tiny_module(modular_data)
    batch = modular_data.train_sampler()(torch.Generator().manual_seed(0), 0)
    for log_alpha, direction in ((10.0, 1), (-10.0, -1)):  # s = 0 < t, then s = 1 > t
        pruner = SubnetworkPruning(module, target_sparsity=0.5, init_log_alpha=log_alpha)
        pruner.compute_means([batch])
        optimizer = pruner.configure_optimizers()
        for _ in range(3):
            optimizer.zero_grad()
            loss, _ = pruner.loss(batch, step=0)
            loss.backward()
            optimizer.step()
        lambda1 = float(pruner.lambdas[0].detach())
        assert direction * lambda1 > 0.2, (log_alpha, lambda1)  # three ascent steps of ~lambda_lr each
        assert float(pruner.lambdas[1].detach()) > 0.2  # (t - s)^2 >= 0: lambda2 only grows


def test_only_masks_and_multipliers_change(modular_data, tmp_path):
    module = tiny_module(modular_data)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    pruner = SubnetworkPruning(module, target_sparsity=0.5, warmup_steps=5, mean_batches=2)
    assert {n for n, p in pruner.named_parameters() if p.requires_grad} == {
        "head_masks.log_alpha",
        "mlp_masks.log_alpha",
        "lambdas",
    }
    alpha = pruner.head_masks.log_alpha.detach().clone()
    fit_pruner(pruner, modular_data, tmp_path, steps=8)
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert not torch.equal(pruner.head_masks.log_alpha.detach(), alpha)
    assert not pruner.model.training  # the frozen model stays in eval mode
    written = json.loads((tmp_path / "lightning_logs" / "version_0" / "mask.json").read_text())
    assert set(written) >= {"heads", "mlps", "sparsity", "seed", "accuracy", "full_accuracy"}
    assert len(written["heads"]) == 2 and len(written["heads"][0]) == 2 and len(written["mlps"]) == 2
    assert set(written["accuracy"]) == set(written["full_accuracy"]) == set(modular_data.task_info.eval_splits)


def test_means_are_the_mean_outputs_and_closed_gates_use_them(modular_data):
    module = tiny_module(modular_data)
    batches = [modular_data.train_sampler()(torch.Generator().manual_seed(i), i) for i in range(2)]
    pruner = SubnetworkPruning(module)
    pruner.compute_means(batches)
    inputs = torch.cat([b.inputs for b in batches])
    _, cap = module.model(inputs, capture=CaptureSpec(heads=True, positions="all"))
    torch.testing.assert_close(pruner.head_mean[1], cap.heads[1].mean(0))  # [H, T, Dh]
    flat = SubnetworkPruning(module, per_position_mean=False)
    flat.compute_means(batches)
    torch.testing.assert_close(flat.head_mean[0], cap.heads[0].mean((0, 2)))  # [H, Dh]
    # every unit closed: the residual stream is the embedding plus every unit's mean output
    out = pruner.masked_forward(inputs, torch.zeros(2, 2), torch.zeros(2))
    model, h = module.model, module.model.embed(inputs)
    for layer, block in enumerate(model.blocks):
        h = h + block.attn.project(pruner.head_mean[layer][None]) + pruner.mlp_mean[layer]
    torch.testing.assert_close(out, torch.nn.functional.linear(model.ln_f(h), model.embed.weight))


def test_expected_sparsity_weighting_and_target_ramp(modular_data):
    module = tiny_module(modular_data)  # d_model 32, 2 heads of 16, MLP 32 -> 128 -> 32
    pruner = SubnetworkPruning(module, target_sparsity=0.6, warmup_steps=10)
    assert float(pruner.head_weight[0, 0]) == 4 * 32 * 16 and float(pruner.mlp_weight[0]) == 2 * 32 * 128
    assert pruner.target_at(0) == 0 and pruner.target_at(5) == pytest.approx(0.3) and pruner.target_at(50) == 0.6
    with torch.no_grad():
        pruner.mlp_masks.log_alpha.fill_(-20.0)  # both MLPs gone, heads kept: 2/3 of the weight
    assert float(pruner.expected_sparsity().detach()) == pytest.approx(2 / 3, abs=1e-4)
    assert pruner.sparsity() == pytest.approx(2 / 3)
    units = SubnetworkPruning(module, weighting="units")
    with torch.no_grad():
        units.mlp_masks.log_alpha.fill_(-20.0)
    assert units.sparsity() == pytest.approx(2 / 6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(weighting="flops"), "weighting"),
        (dict(kl="js"), "kl must be"),
        (dict(lambda_lr=0), "lambda_lr"),
    ],
)
def test_bad_arguments_are_named(modular_data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SubnetworkPruning(tiny_module(modular_data), **kwargs)


def test_reverse_kl_direction():
    pruner = SubnetworkPruning(tiny_module(tiny_modular()), kl="full_pruned")
    p, q = torch.randn(5, 7), torch.randn(5, 7)
    log_p, log_q = p.log_softmax(-1), q.log_softmax(-1)
    torch.testing.assert_close(pruner.divergence(p, q), (log_q.exp() * (log_q - log_p)).sum(-1).mean())
    forward = SubnetworkPruning(tiny_module(tiny_modular()))
    torch.testing.assert_close(forward.divergence(p, q), (log_p.exp() * (log_p - log_q)).sum(-1).mean())
