"""Named hook points on ICLTransformer: the one way capture, gating, patching and pruning reach activations."""

import pytest
import torch

from lightning_icl import CaptureSpec, ICLTransformer
from lightning_icl.hooks import HookPoint
from lightning_icl.interventions.gating import gate_heads

NAMES_PER_LAYER = ("attn.hook_q", "attn.hook_k", "attn.hook_z", "hook_mlp_out", "hook_resid_post")


def model_and_tokens(b=3, t=9):
    torch.manual_seed(0)
    model = ICLTransformer(vocab_size=11, d_model=32, n_layers=2, n_heads=2, max_seq_len=16).eval()
    return model, torch.randint(11, (b, t), generator=torch.Generator().manual_seed(1))


def registered(model) -> int:
    return sum(len(p._forward_hooks) + len(p._forward_pre_hooks) for p in model.hook_points().values())


def test_hook_points_are_listed_by_stable_names():
    model, _ = model_and_tokens()
    names = [f"blocks.{layer}.{name}" for layer in range(2) for name in NAMES_PER_LAYER]
    assert list(model.hook_points()) == names
    assert all(isinstance(p, HookPoint) for p in model.hook_points().values())
    assert model.hook_points()["blocks.1.attn.hook_z"] is model.blocks[1].attn.hook_z


def test_hooks_read_what_a_capture_keeps():
    model, x = model_and_tokens()
    seen = {}
    hooks = {name: (lambda act, name=name: seen.__setitem__(name, act.detach())) for name in model.hook_points()}
    with torch.no_grad(), model.hooks(hooks):
        out, _ = model(x)
    spec = CaptureSpec(residual=True, heads=True, qk=True, positions="all")
    with torch.no_grad():
        ref, cap = model(x, capture=spec)
    torch.testing.assert_close(out, ref)  # reading changes nothing
    for layer in range(2):
        torch.testing.assert_close(seen[f"blocks.{layer}.attn.hook_z"], cap.heads[layer])
        torch.testing.assert_close(seen[f"blocks.{layer}.hook_resid_post"], cap.residual[layer])
        torch.testing.assert_close(seen[f"blocks.{layer}.attn.hook_q"], cap.q[layer])
        torch.testing.assert_close(seen[f"blocks.{layer}.attn.hook_k"], cap.k[layer])
        assert seen[f"blocks.{layer}.hook_mlp_out"].shape == (3, 9, 32)


def test_a_replacing_hook_equals_the_gated_forward():
    model, x = model_and_tokens()
    gates = torch.tensor([[1.0, 0.0], [0.3, 1.0]])
    mu = torch.randn(2, 2, 16)
    hooks = {
        f"blocks.{layer}.attn.hook_z": (lambda z, layer=layer: gate_heads(z, gates[layer], mu[layer]))
        for layer in range(2)
    }
    hooks["blocks.1.hook_mlp_out"] = lambda m: torch.zeros_like(m)
    with torch.no_grad():
        with model.hooks(hooks):
            hooked, _ = model(x)
        gated, _ = model(x, head_gates=gates, ablate_with=mu, mlp_gates=torch.tensor([1.0, 0.0]))
        clean, _ = model(x)
    torch.testing.assert_close(hooked, gated)
    assert not torch.allclose(hooked, clean)


def test_hooks_compose_with_a_capture_that_keeps_z_ungated():
    model, x = model_and_tokens()
    with torch.no_grad():
        _, clean = model(x, capture=CaptureSpec(heads=True, positions="all"))
        with model.hooks({"blocks.0.attn.hook_z": lambda z: 2 * z}):
            _, doubled = model(x, capture=CaptureSpec(heads=True, positions="all", layers=[0]))
    torch.testing.assert_close(doubled.heads[0], 2 * clean.heads[0])  # the user's hook came first


def test_handles_are_removed_after_the_context_also_when_the_forward_raises():
    model, x = model_and_tokens()
    with model.hooks({"blocks.0.hook_resid_post": lambda h: None, "blocks.1.attn.hook_z": [lambda z: z, lambda z: z]}):
        assert registered(model) == 3
    assert registered(model) == 0

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), model.hooks({"blocks.0.hook_mlp_out": boom}):
        model(x)
    assert registered(model) == 0
    with torch.no_grad():
        model(x, capture=CaptureSpec(residual=True, heads=True, qk=True), head_gates=torch.zeros(2, 2))
    assert registered(model) == 0  # forward's own capture and gates are hooks for its call only

    handles = model.add_hooks({"blocks.1.hook_resid_post": lambda h: h})
    assert registered(model) == 1
    handles.remove()
    assert registered(model) == 0


def test_unknown_hook_point_raises_naming_the_argument_and_the_valid_names():
    model, _ = model_and_tokens()
    hooks = {"blocks.0.hook_resid_post": lambda h: None, "blocks.2.hook_z": lambda h: None}
    with pytest.raises(ValueError, match=r"hooks: unknown hook point\(s\) \['blocks.2.hook_z'\].*blocks.0.attn.hook_q"):
        model.hooks(hooks).__enter__()
    assert registered(model) == 0  # nothing half-registered
    with pytest.raises(ValueError, match="hooks: unknown"):
        model.add_hooks({"hook_z": lambda z: None})
